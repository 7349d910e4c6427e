// The rig's joints as `run_stream.py export --gltf` writes them (flame_client.rig), read without UnityEngine:
// rest positions B (5 x 3, metres, FLAME model space = glTF axes) and how they move with the expression,
// E (5 x 3 x n): FLAME regresses its joints from the expressed mesh, so a joint sits at B + E exp.
using System;
using System.Globalization;
using System.Text;

namespace FlameLive.Protocol
{
    public sealed class FlameSkeleton
    {
        public const int JointCount = 5;
        public static readonly string[] JointNames = { "root", "neck", "jaw", "left_eye", "right_eye" };
        /// <summary>FLAME's tree: the neck hangs from the root, the jaw and both eyes from the neck.</summary>
        public static readonly int[] Parents = { -1, 0, 1, 1, 1 };
        public const string MeshName = "flame_head";

        /// <summary>Rest joints B, row-major (joint, xyz).</summary>
        public readonly double[] Rest;
        /// <summary>Expression basis E, row-major (joint, xyz, component); empty when unknown.</summary>
        public readonly double[] ExpBasis;
        public readonly int ExpCount;

        public FlameSkeleton(double[] rest, double[] expBasis)
        {
            if (rest == null || rest.Length != 3 * JointCount)
                throw new FlameLiveException("a FLAME skeleton needs 15 rest joint coordinates");
            expBasis = expBasis ?? new double[0];
            if (expBasis.Length % (3 * JointCount) != 0)
                throw new FlameLiveException("the joints' expression basis must hold 5 x 3 x n values, got " + expBasis.Length);
            Rest = rest;
            ExpBasis = expBasis;
            ExpCount = expBasis.Length / (3 * JointCount);
        }

        /// <summary>A skeleton from the joints' rest local translations (B_k - B_parent; the root's is B_0), as an
        /// importer shows them, without the expression basis: joints then stay where the neutral face has them.</summary>
        public static FlameSkeleton FromRestOffsets(double[] offsets)
        {
            if (offsets == null || offsets.Length != 3 * JointCount)
                throw new FlameLiveException("a FLAME skeleton needs 5 rest offsets");
            var rest = new double[3 * JointCount];
            for (int joint = 0; joint < JointCount; joint++)
                for (int axis = 0; axis < 3; axis++)
                    rest[3 * joint + axis] = offsets[3 * joint + axis] + (Parents[joint] < 0 ? 0.0 : rest[3 * Parents[joint] + axis]);
            return new FlameSkeleton(rest, null);
        }

        /// <summary>The skeleton in a .glb's mesh extras (flameJointRest, flameJointExpBasis), which only the
        /// "flame_head" mesh of an exported rig carries.</summary>
        public static FlameSkeleton FromGlb(byte[] glb)
        {
            string json = GlbJson(glb);
            var rest = NumberArray(json, "flameJointRest");
            if (rest == null)
                throw new FlameLiveException("this .glb has no FLAME skeleton in its '" + MeshName + "' mesh; export the rig with `python run_stream.py export --gltf`");
            return new FlameSkeleton(rest, NumberArray(json, "flameJointExpBasis"));
        }

        /// <summary>The JSON chunk of a binary glTF (12-byte header, then the JSON chunk first).</summary>
        public static string GlbJson(byte[] glb)
        {
            if (glb == null || glb.Length < 20 || Encoding.ASCII.GetString(glb, 0, 4) != "glTF")
                throw new FlameLiveException("not a binary glTF (.glb) file");
            int length = BitConverter.ToInt32(LittleEndian(glb, 12), 0);
            if (Encoding.ASCII.GetString(glb, 16, 4) != "JSON" || length < 0 || length > glb.Length - 20)
                throw new FlameLiveException("the .glb's first chunk is not its JSON");
            return Encoding.UTF8.GetString(glb, 20, length);
        }

        static byte[] LittleEndian(byte[] data, int offset)
        {
            var bytes = new byte[] { data[offset], data[offset + 1], data[offset + 2], data[offset + 3] };
            if (!BitConverter.IsLittleEndian) Array.Reverse(bytes);
            return bytes;
        }

        /// <summary>The array of numbers under a key that appears once in the document, or null when absent.</summary>
        static double[] NumberArray(string json, string key)
        {
            int at = json.IndexOf("\"" + key + "\"", StringComparison.Ordinal);
            if (at < 0) return null;
            int open = json.IndexOf('[', at);
            int close = open < 0 ? -1 : json.IndexOf(']', open);
            if (open < 0 || close < 0 || json.Substring(at + key.Length + 2, open - at - key.Length - 2).Trim() != ":")
                throw new FlameLiveException("the .glb's " + key + " is not an array of numbers");
            var items = json.Substring(open + 1, close - open - 1).Split(',');
            if (items.Length == 1 && items[0].Trim().Length == 0) return new double[0];
            var values = new double[items.Length];
            for (int i = 0; i < items.Length; i++)
                if (!double.TryParse(items[i], NumberStyles.Float, CultureInfo.InvariantCulture, out values[i]))
                    throw new FlameLiveException("the .glb's " + key + "[" + i + "] is not a number");
            return values;
        }
    }
}
