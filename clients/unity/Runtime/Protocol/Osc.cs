// OSC 1.0 reading (messages and bundles) for the flame-live stream, without UnityEngine so that it is
// compiled and tested outside Unity. Every length and offset is checked: a datagram from another program
// or a damaged one raises OscFormatException with a one-line reason, never reads past the buffer.
using System;
using System.Collections.Generic;
using System.Text;

namespace FlameLive.Protocol
{
    /// <summary>A datagram that is not valid OSC 1.0; the message is a one-line reason.</summary>
    public sealed class OscFormatException : Exception
    {
        public OscFormatException(string reason) : base(reason) { }
    }

    /// <summary>One OSC message: its address, type tags (without the leading comma) and arguments
    /// (int, float, double or string, one per tag).</summary>
    public sealed class OscMessage
    {
        public readonly string Address;
        public readonly string TypeTags;
        public readonly object[] Arguments;

        public OscMessage(string address, string typeTags, object[] arguments)
        {
            Address = address;
            TypeTags = typeTags;
            Arguments = arguments;
        }

        /// <summary>All arguments as floats; the message must carry only 32-bit floats.</summary>
        public float[] Floats()
        {
            var values = new float[Arguments.Length];
            for (int i = 0; i < values.Length; i++)
            {
                if (TypeTags[i] != 'f')
                    throw new OscFormatException(Address + ": argument " + i + " is '" + TypeTags[i] + "', expected float");
                values[i] = (float)Arguments[i];
            }
            return values;
        }
    }

    public static class OscReader
    {
        /// <summary>Bundles inside bundles deeper than this are refused (ours are never nested).</summary>
        public const int MaxBundleDepth = 4;
        static readonly byte[] BundleTag = Encoding.ASCII.GetBytes("#bundle\0");

        /// <summary>The messages of a datagram in order, bundles flattened (their time tags are ignored:
        /// flame-live sends everything for immediate use).</summary>
        public static List<OscMessage> ReadPacket(byte[] data, int length)
        {
            if (data == null || length < 0 || length > data.Length)
                throw new ArgumentOutOfRangeException("length");
            var messages = new List<OscMessage>();
            ReadElement(data, 0, length, 0, messages);
            return messages;
        }

        public static bool IsBundle(byte[] data, int offset, int length)
        {
            if (length < BundleTag.Length) return false;
            for (int i = 0; i < BundleTag.Length; i++)
                if (data[offset + i] != BundleTag[i]) return false;
            return true;
        }

        static void ReadElement(byte[] data, int offset, int length, int depth, List<OscMessage> messages)
        {
            if (length == 0 || length % 4 != 0)
                throw new OscFormatException("an OSC packet's size must be a positive multiple of 4, got " + length);
            if (IsBundle(data, offset, length))
                ReadBundle(data, offset, length, depth, messages);
            else
                messages.Add(ReadMessage(data, offset, length));
        }

        static void ReadBundle(byte[] data, int offset, int length, int depth, List<OscMessage> messages)
        {
            if (depth >= MaxBundleDepth)
                throw new OscFormatException("bundles nested deeper than " + MaxBundleDepth);
            int end = offset + length;
            int position = offset + 16; // "#bundle\0" and the 8-byte time tag
            if (position > end) throw new OscFormatException("bundle shorter than its header");
            while (position < end)
            {
                if (end - position < 4) throw new OscFormatException("bundle element size cut short");
                int size = ReadInt32(data, position);
                position += 4;
                if (size <= 0 || size > end - position)
                    throw new OscFormatException("bundle element of " + size + " bytes does not fit the bundle");
                ReadElement(data, position, size, depth + 1, messages);
                position += size;
            }
        }

        static OscMessage ReadMessage(byte[] data, int offset, int length)
        {
            int end = offset + length;
            int position = offset;
            string address = ReadString(data, ref position, end);
            if (address.Length == 0 || address[0] != '/')
                throw new OscFormatException("not an OSC message: the address must start with '/'");
            if (position == end) return new OscMessage(address, "", new object[0]); // OSC 1.0 allows no type tags
            string tags = ReadString(data, ref position, end);
            if (tags.Length == 0 || tags[0] != ',')
                throw new OscFormatException(address + ": type tags must start with ','");
            tags = tags.Substring(1);
            var arguments = new object[tags.Length];
            for (int i = 0; i < tags.Length; i++)
            {
                switch (tags[i])
                {
                    case 'i': Need(address, position, 4, end); arguments[i] = ReadInt32(data, position); position += 4; break;
                    case 'f': Need(address, position, 4, end); arguments[i] = ReadFloat(data, position); position += 4; break;
                    case 'd': Need(address, position, 8, end); arguments[i] = ReadDouble(data, position); position += 8; break;
                    case 's': arguments[i] = ReadString(data, ref position, end); break;
                    default: throw new OscFormatException(address + ": unsupported argument type '" + tags[i] + "'");
                }
            }
            if (position != end) throw new OscFormatException(address + ": " + (end - position) + " bytes after the last argument");
            return new OscMessage(address, tags, arguments);
        }

        static void Need(string address, int position, int count, int end)
        {
            if (end - position < count) throw new OscFormatException(address + ": arguments cut short");
        }

        static string ReadString(byte[] data, ref int position, int end)
        {
            int terminator = Array.IndexOf(data, (byte)0, position, end - position);
            if (terminator < 0) throw new OscFormatException("OSC string without its terminating NUL");
            string text = Encoding.UTF8.GetString(data, position, terminator - position);
            position = (terminator + 4) & ~3; // the NUL, then padding to a multiple of 4
            if (position > end) throw new OscFormatException("OSC string padding runs past the packet");
            return text;
        }

        public static int ReadInt32(byte[] data, int position)
        {
            return (data[position] << 24) | (data[position + 1] << 16) | (data[position + 2] << 8) | data[position + 3];
        }

        static float ReadFloat(byte[] data, int position)
        {
            return BitConverter.ToSingle(BitConverter.GetBytes(ReadInt32(data, position)), 0);
        }

        static double ReadDouble(byte[] data, int position)
        {
            long high = (uint)ReadInt32(data, position);
            long low = (uint)ReadInt32(data, position + 4);
            return BitConverter.Int64BitsToDouble((high << 32) | low);
        }
    }
}
