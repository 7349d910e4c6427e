// One frame of the flame-live OSC stream and its decoding from a datagram (see realtime/publishers.py for
// the address space). No UnityEngine here: tests compile this file with mono.
using System;
using System.Collections.Generic;

namespace FlameLive.Protocol
{
    /// <summary>What one /flame/frame bundle carries. Rotations are axis-angle radians, lengths metres.</summary>
    public sealed class FlameFrame
    {
        public const int BlendshapeCount = 52;
        public const int MaxExpression = 400;

        public int Seq;
        /// <summary>Wall-clock seconds (Unix time) when the image was captured / the frame was published.</summary>
        public double CaptureTime, PublishTime;
        /// <summary>False when no face was tracked: the parameters repeat the last fit and should not drive anything.</summary>
        public bool Valid;
        /// <summary>Places the model in OpenCV camera space: x_cam = R(HeadRot) x_model + HeadTrans.</summary>
        public float[] HeadRot = new float[3], HeadTrans = new float[3];
        /// <summary>FLAME's joints: neck, jaw, then the eyes (left, right), each an axis-angle.</summary>
        public float[] NeckPose = new float[3], JawPose = new float[3], EyePose = new float[6];
        public float[] Expression = new float[0];
        /// <summary>Eyelid weights, the person's left then right (0 open, 1 closed); empty unless the model has
        /// metrical-tracker's eyelid blendshapes.</summary>
        public float[] Eyelids = new float[0];
        /// <summary>MediaPipe's 52 scores (empty when the frame had none).</summary>
        public float[] Blendshapes = new float[0];
        public float FovDeg;
    }

    public enum DecodeResult
    {
        /// <summary>A frame bundle, decoded.</summary>
        Frame,
        /// <summary>Another flame-live bundle (identity, metrics): well formed, nothing for a rig to do.</summary>
        Other,
        /// <summary>Not flame-live's OSC, or broken: the reason says why.</summary>
        Rejected,
    }

    public static class FlameOscDecoder
    {
        /// <summary>Decode one datagram. Never throws for bad input: a broken or foreign datagram is Rejected
        /// with a one-line reason.</summary>
        public static DecodeResult Decode(byte[] data, int length, out FlameFrame frame, out string reason)
        {
            frame = null;
            reason = null;
            List<OscMessage> messages;
            try
            {
                messages = OscReader.ReadPacket(data, length);
            }
            catch (OscFormatException error)
            {
                reason = error.Message;
                return DecodeResult.Rejected;
            }
            foreach (var message in messages)
            {
                if (!message.Address.StartsWith("/flame/", StringComparison.Ordinal))
                {
                    reason = "not a flame-live message (address " + Shorten(message.Address) + "); is another program sending to this port?";
                    return DecodeResult.Rejected;
                }
            }
            if (messages.Count == 0 || messages[0].Address != "/flame/frame") return DecodeResult.Other;
            try
            {
                frame = ReadFrame(messages);
                return DecodeResult.Frame;
            }
            catch (OscFormatException error)
            {
                reason = error.Message;
                frame = null;
                return DecodeResult.Rejected;
            }
        }

        static FlameFrame ReadFrame(List<OscMessage> messages)
        {
            var header = messages[0];
            if (header.TypeTags != "iddi") throw new OscFormatException("/flame/frame: expected types iddi, got " + Shorten(header.TypeTags));
            var frame = new FlameFrame
            {
                Seq = (int)header.Arguments[0],
                CaptureTime = (double)header.Arguments[1],
                PublishTime = (double)header.Arguments[2],
                Valid = (int)header.Arguments[3] != 0,
            };
            if (!frame.Valid) return frame;
            bool head = false, pose = false, exp = false;
            for (int i = 1; i < messages.Count; i++)
            {
                var message = messages[i];
                switch (message.Address)
                {
                    case "/flame/head":
                        var values = Floats(message, 6, 6);
                        Array.Copy(values, 0, frame.HeadRot, 0, 3);
                        Array.Copy(values, 3, frame.HeadTrans, 0, 3);
                        head = true;
                        break;
                    case "/flame/pose":
                        var joints = Floats(message, 12, 12);
                        Array.Copy(joints, 0, frame.NeckPose, 0, 3);
                        Array.Copy(joints, 3, frame.JawPose, 0, 3);
                        Array.Copy(joints, 6, frame.EyePose, 0, 6);
                        pose = true;
                        break;
                    case "/flame/exp":
                        frame.Expression = Floats(message, 1, FlameFrame.MaxExpression);
                        exp = true;
                        break;
                    case "/flame/eyelids":
                        frame.Eyelids = Floats(message, 2, 2);
                        break;
                    case "/flame/blendshapes":
                        frame.Blendshapes = Floats(message, FlameFrame.BlendshapeCount, FlameFrame.BlendshapeCount);
                        break;
                    case "/flame/fov":
                        float fov = Floats(message, 1, 1)[0];
                        if (!(fov > 0f && fov < 180f)) throw new OscFormatException("/flame/fov: " + fov + " is not between 0 and 180 degrees");
                        frame.FovDeg = fov;
                        break;
                    // Per-name blendshape messages repeat /flame/blendshapes; later additions are ignored like unknown keys.
                }
            }
            if (!(head && pose && exp)) throw new OscFormatException("/flame/frame: a valid frame needs /flame/head, /flame/pose and /flame/exp");
            return frame;
        }

        static float[] Floats(OscMessage message, int min, int max)
        {
            var values = message.Floats();
            if (values.Length < min || values.Length > max)
                throw new OscFormatException(message.Address + ": " + values.Length + " values, expected " + (min == max ? min.ToString() : min + ".." + max));
            for (int i = 0; i < values.Length; i++)
                if (float.IsNaN(values[i]) || float.IsInfinity(values[i]))
                    throw new OscFormatException(message.Address + "[" + i + "] is not finite");
            return values;
        }

        static string Shorten(string text)
        {
            return text.Length <= 40 ? text : text.Substring(0, 40) + "...";
        }
    }
}
