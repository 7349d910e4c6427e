// A console program around the receiver's plain C# files, for tests/test_unity_client.py (compiled with
// mono's mcs; "Tests~" is a folder Unity does not import). It listens like FlameLiveReceiver does and
// prints one JSON line per frame taken with TakeNewest: the decoded values and what the receiver would set
// on the rig (pose-corrective weights, head and joint transforms in glTF and Unity axes).
//
//   mono ProtocolCheck.exe PORT FRAMES [RIG.glb]
// prints "listening PORT", then FRAMES frame lines (with RIG.glb, also the joints' local transforms), then a
// stats line. A port in use or a bad .glb prints one line on stderr and exits with status 2.
using System;
using System.Globalization;
using System.Text;
using System.Threading;
using FlameLive.Protocol;

static class ProtocolCheck
{
    static int Main(string[] args)
    {
        int port = int.Parse(args[0], CultureInfo.InvariantCulture);
        int expected = int.Parse(args[1], CultureInfo.InvariantCulture);
        FlameLiveListener listener;
        FlameSkeleton skeleton = null;
        try
        {
            if (args.Length > 2) skeleton = FlameSkeleton.FromGlb(System.IO.File.ReadAllBytes(args[2]));
            listener = new FlameLiveListener(port);
        }
        catch (FlameLiveException error)
        {
            Console.Error.WriteLine("error: " + error.Message);
            return 2;
        }
        using (listener)
        {
            Console.WriteLine("listening " + listener.Port);
            Console.Out.Flush();
            var weights = new float[FlameRig.PoseCorrectiveCount];
            var translations = new double[3 * FlameSkeleton.JointCount];
            var rotations = new Quat[FlameSkeleton.JointCount];
            var deadline = DateTime.UtcNow.AddSeconds(60);
            for (int printed = 0; printed < expected && DateTime.UtcNow < deadline;)
            {
                var frame = listener.TakeNewest();
                if (frame == null)
                {
                    Thread.Sleep(1);
                    continue;
                }
                FlameRig.PoseCorrectiveWeights(frame, weights);
                var json = new StringBuilder("{");
                Field(json, "seq", frame.Seq.ToString(CultureInfo.InvariantCulture));
                Field(json, "t_capture", Number(frame.CaptureTime));
                Field(json, "t_publish", Number(frame.PublishTime));
                Field(json, "valid", frame.Valid ? "true" : "false");
                Field(json, "head_rot", Array(frame.HeadRot));
                Field(json, "head_trans", Array(frame.HeadTrans));
                Field(json, "neck_pose", Array(frame.NeckPose));
                Field(json, "jaw_pose", Array(frame.JawPose));
                Field(json, "eye_pose", Array(frame.EyePose));
                Field(json, "exp", Array(frame.Expression));
                Field(json, "eyelids", Array(frame.Eyelids));
                Field(json, "blendshapes", Array(frame.Blendshapes));
                Field(json, "fov_deg", Number(frame.FovDeg));
                Field(json, "pose_correctives", Array(weights));
                Field(json, "gltf_head_rotation", Quaternion(FlameRig.GltfHeadRotation(frame)));
                Field(json, "gltf_head_translation", Array(FlameRig.GltfHeadTranslation(frame)));
                Field(json, "unity_head_rotation", Quaternion(FlameRig.GltfToUnity(FlameRig.GltfHeadRotation(frame))));
                Field(json, "unity_head_position", Array(FlameRig.GltfToUnity(FlameRig.GltfHeadTranslation(frame))));
                Field(json, "unity_jaw_rotation", Quaternion(FlameRig.GltfToUnity(FlameRig.GltfJointRotation(frame.JawPose, 0))));
                if (skeleton != null)
                {
                    FlameRig.JointTransforms(skeleton, frame, translations, rotations);
                    Field(json, "joint_translations", Array(translations));
                    var quaternions = new string[rotations.Length];
                    for (int i = 0; i < rotations.Length; i++) quaternions[i] = Quaternion(rotations[i]);
                    Field(json, "joint_rotations", "[" + string.Join(", ", quaternions) + "]");
                }
                json.Length -= 1;
                Console.WriteLine(json.Append('}').ToString());
                Console.Out.Flush();
                printed++;
            }
            Console.WriteLine("{\"frames\": " + listener.FramesReceived + ", \"rejected\": " + listener.Rejected
                + ", \"first_rejection\": \"" + Escape(listener.FirstRejection) + "\", \"last_rejection\": \"" + Escape(listener.LastRejection) + "\"}");
        }
        return 0;
    }

    static void Field(StringBuilder json, string name, string value)
    {
        json.Append('"').Append(name).Append("\": ").Append(value).Append(',');
    }

    static string Number(double value)
    {
        return value.ToString("R", CultureInfo.InvariantCulture);
    }

    static string Array(float[] values)
    {
        var parts = new string[values.Length];
        for (int i = 0; i < values.Length; i++) parts[i] = Number(values[i]);
        return "[" + string.Join(", ", parts) + "]";
    }

    static string Array(double[] values)
    {
        var parts = new string[values.Length];
        for (int i = 0; i < values.Length; i++) parts[i] = Number(values[i]);
        return "[" + string.Join(", ", parts) + "]";
    }

    static string Quaternion(Quat q)
    {
        return Array(new[] { q.X, q.Y, q.Z, q.W });
    }

    static string Escape(string text)
    {
        return text == null ? "" : text.Replace("\\", "\\\\").Replace("\"", "\\\"");
    }
}
