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

        [Header("Rig (found by name under Head Transform when left empty)")]
        [Tooltip("The imported glTF's root: it moves and turns like the tracked head, relative to its parent, " +
                 "whose origin is the webcam looking down -Z.")]
        public Transform headTransform;
        [Tooltip("The 'flame_head' mesh with blend shapes exp_000... and pose_000...pose_035.")]
        public SkinnedMeshRenderer face;
        public Transform neck, jaw, leftEye, rightEye;

        [Header("Options")]
        [Tooltip("Move the head as well as turn it (off: it turns in place).")]
        public bool drivePosition = true;
        [Tooltip("Blend shape weight for a FLAME coefficient of 1: 100 for glTFast and UnityGLTF, whose imported " +
                 "shapes are full at weight 100. Negative weights need Player Settings > Other Settings > " +
                 "'Clamp BlendShapes (Deprecated)' off.")]
        public float blendShapeScale = 100f;

        FlameLiveListener listener;
        int[] expressionShapes = new int[0];
        readonly int[] poseShapes = new int[FlameRig.PoseCorrectiveCount];
        readonly float[] poseWeights = new float[FlameRig.PoseCorrectiveCount];
        Quaternion[] restRotations;
        Transform[] joints;
        bool rejectionReported;

        /// <summary>The last frame applied (or held, when its Valid is false); null before the first.</summary>
        public FlameFrame LastFrame { get; private set; }
        public long FramesReceived { get { return listener == null ? 0 : listener.FramesReceived; } }
        public long Rejected { get { return listener == null ? 0 : listener.Rejected; } }

        void Awake()
        {
            if (headTransform == null) headTransform = transform;
            if (face == null) face = FindFace(headTransform);
            if (neck == null) neck = FindDeep(headTransform, "neck");
            if (jaw == null) jaw = FindDeep(headTransform, "jaw");
            if (leftEye == null) leftEye = FindDeep(headTransform, "left_eye");
            if (rightEye == null) rightEye = FindDeep(headTransform, "right_eye");
            joints = new[] { neck, jaw, leftEye, rightEye };
            restRotations = new Quaternion[joints.Length];
            for (int i = 0; i < joints.Length; i++)
                restRotations[i] = joints[i] != null ? joints[i].localRotation : Quaternion.identity;
            ResolveBlendShapes();
        }

        void OnEnable()
        {
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
                    if (expressionShapes[i] >= 0) face.SetBlendShapeWeight(expressionShapes[i], frame.Expression[i] * blendShapeScale);
                FlameRig.PoseCorrectiveWeights(frame, poseWeights);
                for (int k = 0; k < poseShapes.Length; k++)
                    if (poseShapes[k] >= 0) face.SetBlendShapeWeight(poseShapes[k], poseWeights[k] * blendShapeScale);
            }
            SetJoint(0, FlameRig.GltfJointRotation(frame.NeckPose, 0));
            SetJoint(1, FlameRig.GltfJointRotation(frame.JawPose, 0));
            SetJoint(2, FlameRig.GltfJointRotation(frame.EyePose, 0));
            SetJoint(3, FlameRig.GltfJointRotation(frame.EyePose, 3));
            headTransform.localRotation = ToUnity(FlameRig.GltfToUnity(FlameRig.GltfHeadRotation(frame)));
            if (drivePosition)
            {
                var position = FlameRig.GltfToUnity(FlameRig.GltfHeadTranslation(frame));
                headTransform.localPosition = new Vector3((float)position[0], (float)position[1], (float)position[2]);
            }
        }

        void SetJoint(int index, Quat gltfRotation)
        {
            if (joints[index] != null) joints[index].localRotation = restRotations[index] * ToUnity(FlameRig.GltfToUnity(gltfRotation));
        }

        void ResolveBlendShapes()
        {
            if (face == null || face.sharedMesh == null)
            {
                Debug.LogWarning("flame-live: no mesh with FLAME blend shapes (exp_000...) under " + headTransform.name + "; only bones and the head will move", this);
                return;
            }
            var mesh = face.sharedMesh;
            int expressions = 0;
            while (mesh.GetBlendShapeIndex(ExpressionName(expressions)) >= 0) expressions++;
            expressionShapes = new int[expressions];
            for (int i = 0; i < expressions; i++) expressionShapes[i] = mesh.GetBlendShapeIndex(ExpressionName(i));
            for (int k = 0; k < poseShapes.Length; k++) poseShapes[k] = mesh.GetBlendShapeIndex("pose_" + k.ToString("000"));
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

        static SkinnedMeshRenderer FindFace(Transform root)
        {
            foreach (var renderer in root.GetComponentsInChildren<SkinnedMeshRenderer>(true))
                if (renderer.sharedMesh != null && renderer.sharedMesh.GetBlendShapeIndex(ExpressionName(0)) >= 0) return renderer;
            return null;
        }

        static Transform FindDeep(Transform root, string name)
        {
            foreach (var child in root.GetComponentsInChildren<Transform>(true))
                if (child.name == name) return child;
            return null;
        }

        static Quaternion ToUnity(Quat q)
        {
            return new Quaternion((float)q.X, (float)q.Y, (float)q.Z, (float)q.W);
        }
    }
}
