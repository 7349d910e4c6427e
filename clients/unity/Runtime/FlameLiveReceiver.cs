// Drives a FLAME head exported by `python run_stream.py export --gltf` and imported with glTFast or UnityGLTF
// from flame-live's OSC stream (`python run_stream.py --osc 127.0.0.1:9100`). The network and the FLAME maths
// live in FlameLive.Protocol (plain C#, tested outside Unity); this component only applies the newest frame.
using FlameLive.Protocol;
using UnityEngine;

namespace FlameLive
{
    [AddComponentMenu("flame-live/Flame Live Receiver")]
    [DisallowMultipleComponent]
    public sealed class FlameLiveReceiver : MonoBehaviour
    {
        [Header("Stream")]
        [Tooltip("UDP port flame-live sends OSC to (--osc 127.0.0.1:PORT).")]
        public int port = FlameLiveListener.DefaultPort;
        [Tooltip("127.0.0.1 receives from this machine only; 0.0.0.0 also from others on the network.")]
        public string listenAddress = "127.0.0.1";

        [Header("Rig (found by name under this object when left empty)")]
        [Tooltip("The 'flame_head' mesh with blend shapes exp_000..., pose_000...pose_035 (and eyelid_left, eyelid_right from a model with eyelids).")]
        public SkinnedMeshRenderer face;
        [Tooltip("The joints root, neck, jaw, left_eye, right_eye. The root carries the head's pose relative to " +
                 "the imported rig's root object, whose origin is the webcam looking down -Z (glTF's camera convention).")]
        public Transform root, neck, jaw, leftEye, rightEye;
        [Tooltip("Optional: the exported .glb copied into Assets with the extension .bytes. It holds how FLAME's " +
                 "joints move with the expression; without it they stay where the neutral face has them.")]
        public TextAsset rigFile;

        [Header("Options")]
        [Tooltip("Move the head as well as turn it (off: it turns in place).")]
        public bool drivePosition = true;

        FlameLiveListener listener;
        FlameSkeleton skeleton;
        Transform[] joints;
        Vector3 restRootPosition;
        int[] expressionShapes = new int[0];
        float[] expressionScales = new float[0];
        readonly int[] eyelidShapes = { -1, -1 };
        readonly float[] eyelidScales = new float[2];
        readonly int[] poseShapes = new int[FlameRig.PoseCorrectiveCount];
        readonly float[] poseScales = new float[FlameRig.PoseCorrectiveCount];
        readonly float[] poseWeights = new float[FlameRig.PoseCorrectiveCount];
        readonly double[] translations = new double[3 * FlameSkeleton.JointCount];
        readonly Quat[] rotations = new Quat[FlameSkeleton.JointCount];
        bool rejectionReported;

        /// <summary>The last frame received (applied, or held when its Valid is false); null before the first.</summary>
        public FlameFrame LastFrame { get; private set; }
        public long FramesReceived { get { return listener == null ? 0 : listener.FramesReceived; } }
        public long Rejected { get { return listener == null ? 0 : listener.Rejected; } }

        void Awake()
        {
            if (face == null) face = FindFace(transform);
            joints = new[] { root, neck, jaw, leftEye, rightEye };
            for (int i = 0; i < joints.Length; i++)
            {
                if (joints[i] == null) joints[i] = FindDeep(transform, FlameSkeleton.JointNames[i]);
                if (joints[i] == null)
                {
                    Debug.LogError("flame-live: no joint '" + FlameSkeleton.JointNames[i] + "' under " + name + "; add this component to the imported rig's root object", this);
                    enabled = false;
                    return;
                }
            }
            restRootPosition = joints[0].localPosition;
            skeleton = LoadSkeleton();
            ResolveBlendShapes();
        }

        void OnEnable()
        {
            if (joints == null || skeleton == null) return; // Awake found no rig
            try
            {
                listener = new FlameLiveListener(port, listenAddress);
            }
            catch (FlameLiveException error)
            {
                Debug.LogError("flame-live: " + error.Message, this);
                enabled = false;
            }
        }

        void OnDisable()
        {
            if (listener != null) listener.Dispose();
            listener = null;
        }

        void Update()
        {
            if (listener == null) return;
            ReportRejections();
            var frame = listener.TakeNewest();
            if (frame == null) return;
            LastFrame = frame;
            if (frame.Valid) Apply(frame); // without a face the rig holds its last pose
        }

        void Apply(FlameFrame frame)
        {
            if (face != null)
            {
                int count = Mathf.Min(expressionShapes.Length, frame.Expression.Length);
                for (int i = 0; i < count; i++)
                    face.SetBlendShapeWeight(expressionShapes[i], frame.Expression[i] * expressionScales[i]);
                FlameRig.PoseCorrectiveWeights(frame, poseWeights);
                for (int k = 0; k < poseShapes.Length; k++)
                    if (poseShapes[k] >= 0) face.SetBlendShapeWeight(poseShapes[k], poseWeights[k] * poseScales[k]);
                for (int side = 0; side < eyelidShapes.Length; side++)
                {
                    float weight = frame.Eyelids.Length == eyelidShapes.Length ? frame.Eyelids[side] : 0f; // no eyelids: open
                    if (eyelidShapes[side] >= 0) face.SetBlendShapeWeight(eyelidShapes[side], weight * eyelidScales[side]);
                }
            }
            FlameRig.JointTransforms(skeleton, frame, translations, rotations);
            for (int joint = 0; joint < joints.Length; joint++)
            {
                var q = FlameRig.GltfToUnity(rotations[joint]);
                joints[joint].localRotation = new Quaternion((float)q.X, (float)q.Y, (float)q.Z, (float)q.W);
                // glTF to Unity negates x, for positions as for rotations.
                var position = new Vector3((float)-translations[3 * joint], (float)translations[3 * joint + 1], (float)translations[3 * joint + 2]);
                joints[joint].localPosition = joint == 0 && !drivePosition ? restRootPosition : position;
            }
        }

        FlameSkeleton LoadSkeleton()
        {
            if (rigFile != null)
            {
                try
                {
                    return FlameSkeleton.FromGlb(rigFile.bytes);
                }
                catch (FlameLiveException error)
                {
                    Debug.LogWarning("flame-live: " + rigFile.name + ": " + error.Message + "; using the imported joints' rest positions", this);
                }
            }
            var offsets = new double[3 * FlameSkeleton.JointCount];
            for (int joint = 0; joint < joints.Length; joint++)
            {
                var rest = joints[joint].localPosition; // Unity axes: x back to glTF's by negation
                offsets[3 * joint] = -rest.x;
                offsets[3 * joint + 1] = rest.y;
                offsets[3 * joint + 2] = rest.z;
            }
            return FlameSkeleton.FromRestOffsets(offsets);
        }

        void ResolveBlendShapes()
        {
            if (face == null || face.sharedMesh == null)
            {
                Debug.LogWarning("flame-live: no mesh with FLAME blend shapes (exp_000...) under " + name + "; only the joints will move", this);
                return;
            }
            var mesh = face.sharedMesh;
            int expressions = 0;
            while (mesh.GetBlendShapeIndex(ExpressionName(expressions)) >= 0) expressions++;
            expressionShapes = new int[expressions];
            expressionScales = new float[expressions];
            for (int i = 0; i < expressions; i++)
            {
                expressionShapes[i] = mesh.GetBlendShapeIndex(ExpressionName(i));
                expressionScales[i] = FullWeight(mesh, expressionShapes[i]);
            }
            for (int k = 0; k < poseShapes.Length; k++)
            {
                poseShapes[k] = mesh.GetBlendShapeIndex("pose_" + k.ToString("000"));
                poseScales[k] = poseShapes[k] >= 0 ? FullWeight(mesh, poseShapes[k]) : 0f;
            }
            // A rig exported from a model with eyelid blendshapes has these two; the others have neither.
            for (int side = 0; side < eyelidShapes.Length; side++)
            {
                eyelidShapes[side] = mesh.GetBlendShapeIndex(side == 0 ? "eyelid_left" : "eyelid_right");
                eyelidScales[side] = eyelidShapes[side] >= 0 ? FullWeight(mesh, eyelidShapes[side]) : 0f;
            }
        }

        /// <summary>The weight at which a shape is fully applied (a glTF weight of 1): its single frame's weight,
        /// 1 in current glTFast, 100 in importers that follow Unity's percent convention.</summary>
        static float FullWeight(Mesh mesh, int shape)
        {
            return mesh.GetBlendShapeFrameWeight(shape, mesh.GetBlendShapeFrameCount(shape) - 1);
        }

        void ReportRejections()
        {
            if (rejectionReported || listener.Rejected == 0) return;
            rejectionReported = true; // once: a foreign sender would otherwise flood the console
            Debug.LogWarning("flame-live: ignoring datagrams on port " + listener.Port + ": " + listener.FirstRejection, this);
        }

        static string ExpressionName(int index)
        {
            return "exp_" + index.ToString("000");
        }

        static SkinnedMeshRenderer FindFace(Transform under)
        {
            foreach (var renderer in under.GetComponentsInChildren<SkinnedMeshRenderer>(true))
                if (renderer.sharedMesh != null && renderer.sharedMesh.GetBlendShapeIndex(ExpressionName(0)) >= 0) return renderer;
            return null;
        }

        static Transform FindDeep(Transform under, string jointName)
        {
            foreach (var child in under.GetComponentsInChildren<Transform>(true))
                if (child.name == jointName) return child;
            return null;
        }
    }
}
