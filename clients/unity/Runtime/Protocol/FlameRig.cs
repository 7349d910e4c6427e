// FLAME's rig maths for a glTF-imported head, without UnityEngine (compiled and tested with mono):
// pose-corrective weights from the joint rotations, and the head and joint transforms in glTF's and
// Unity's axes. The conventions are those of the glTF exporter (flame_client's rig module):
//
// * Pose correctives: FLAME's pose feature, R - I of the joints 1..4 (neck, jaw, left eye, right eye),
//   row-major: weight k = (joint - 1) * 9 + 3 * row + col, morph targets pose_000..pose_035.
// * Head: the stream places the model in OpenCV camera space, x_cam = R(head_rot) x_model + head_trans
//   (x right, y down, z forward). glTF's world is that camera space turned Y-up, x_gltf = D x_cam with
//   D = diag(1, -1, -1): the webcam sits at the origin looking down -Z, like a glTF camera, and the head's
//   transform is R_h = D R(head_rot), t_h = D head_trans. A head looking into the camera has the identity
//   rotation (FLAME's model axes are glTF's: y up, z out of the face).
// * Joints (JointTransforms): the root joint carries the head transform, rotation R_h and translation
//   t_h + R_h B_0; joint k's local rotation is FLAME's R_k and its translation (B_k - B_parent) + (I - R_k) E_k exp,
//   the shift that keeps glTF's fixed inverse bind matrices equal to FLAME's expression-dependent joints.
// * Unity: glTFast and UnityGLTF both import glTF's right-handed axes into Unity's left-handed ones by
//   negating X. A position (x, y, z) becomes (-x, y, z) and a rotation quaternion (x, y, z, w) becomes
//   (x, -y, -z, w): the same rotation seen through that mirror.
using System;

namespace FlameLive.Protocol
{
    /// <summary>A rotation quaternion (x, y, z, w), the component order of glTF and Unity.</summary>
    public struct Quat
    {
        public double X, Y, Z, W;

        public Quat(double x, double y, double z, double w)
        {
            X = x; Y = y; Z = z; W = w;
        }

        /// <summary>Hamilton product a * b: the rotation b followed by a.</summary>
        public static Quat operator *(Quat a, Quat b)
        {
            return new Quat(
                a.W * b.X + a.X * b.W + a.Y * b.Z - a.Z * b.Y,
                a.W * b.Y - a.X * b.Z + a.Y * b.W + a.Z * b.X,
                a.W * b.Z + a.X * b.Y - a.Y * b.X + a.Z * b.W,
                a.W * b.W - a.X * b.X - a.Y * b.Y - a.Z * b.Z);
        }

        /// <summary>This rotation or its negation (the same rotation), whichever has w >= 0.</summary>
        public Quat Canonical()
        {
            return W < 0 ? new Quat(-X, -Y, -Z, -W) : this;
        }
    }

    public static class FlameRig
    {
        /// <summary>Joints 1..4 of FLAME (neck, jaw, left eye, right eye), 9 values each.</summary>
        public const int PoseCorrectiveCount = 36;
        /// <summary>D = diag(1, -1, -1), OpenCV camera to glTF, is 180 degrees about x.</summary>
        static readonly Quat CameraToGltf = new Quat(1, 0, 0, 0);

        /// <summary>Row-major 3x3 matrix of the axis-angle values[offset..offset+3] (Rodrigues' formula).</summary>
        public static double[] RotationMatrix(float[] values, int offset)
        {
            double x = values[offset], y = values[offset + 1], z = values[offset + 2];
            double angle = Math.Sqrt(x * x + y * y + z * z);
            var matrix = new double[] { 1, 0, 0, 0, 1, 0, 0, 0, 1 };
            if (angle < 1e-12) return matrix;
            x /= angle; y /= angle; z /= angle;
            double c = Math.Cos(angle), s = Math.Sin(angle), t = 1 - c;
            matrix[0] = t * x * x + c;     matrix[1] = t * x * y - s * z; matrix[2] = t * x * z + s * y;
            matrix[3] = t * x * y + s * z; matrix[4] = t * y * y + c;     matrix[5] = t * y * z - s * x;
            matrix[6] = t * x * z - s * y; matrix[7] = t * y * z + s * x; matrix[8] = t * z * z + c;
            return matrix;
        }

        /// <summary>The 36 pose-corrective weights (R - I, row-major, joints neck, jaw, left eye, right eye)
        /// of one frame, written into output (length 36).</summary>
        public static void PoseCorrectiveWeights(FlameFrame frame, float[] output)
        {
            if (output == null || output.Length != PoseCorrectiveCount)
                throw new ArgumentException("output must hold " + PoseCorrectiveCount + " weights");
            WriteFeature(frame.NeckPose, 0, output, 0);
            WriteFeature(frame.JawPose, 0, output, 9);
            WriteFeature(frame.EyePose, 0, output, 18);
            WriteFeature(frame.EyePose, 3, output, 27);
        }

        static void WriteFeature(float[] pose, int offset, float[] output, int start)
        {
            var matrix = RotationMatrix(pose, offset);
            for (int k = 0; k < 9; k++)
                output[start + k] = (float)(matrix[k] - (k % 4 == 0 ? 1.0 : 0.0));
        }

        /// <summary>Unit quaternion of the axis-angle values[offset..offset+3].</summary>
        public static Quat AxisAngleQuaternion(float[] values, int offset)
        {
            double x = values[offset], y = values[offset + 1], z = values[offset + 2];
            double angle = Math.Sqrt(x * x + y * y + z * z);
            if (angle < 1e-12) return new Quat(0, 0, 0, 1);
            double scale = Math.Sin(0.5 * angle) / angle;
            return new Quat(x * scale, y * scale, z * scale, Math.Cos(0.5 * angle));
        }

        /// <summary>The head's rotation in glTF's world: D R(head_rot).</summary>
        public static Quat GltfHeadRotation(FlameFrame frame)
        {
            return (CameraToGltf * AxisAngleQuaternion(frame.HeadRot, 0)).Canonical();
        }

        /// <summary>The head's translation in glTF's world (metres): D head_trans.</summary>
        public static double[] GltfHeadTranslation(FlameFrame frame)
        {
            return new double[] { frame.HeadTrans[0], -frame.HeadTrans[1], -frame.HeadTrans[2] };
        }

        /// <summary>A joint's local rotation (FLAME's joint rotation, in its parent's axes) in glTF: R(pose).</summary>
        public static Quat GltfJointRotation(float[] pose, int offset)
        {
            return AxisAngleQuaternion(pose, offset).Canonical();
        }

        /// <summary>Local translations (glTF axes, metres, 5 x 3 row-major) and rotations of the joints root, neck,
        /// jaw, left_eye, right_eye for one frame. Expression components beyond the skeleton's are ignored,
        /// missing ones count as 0.</summary>
        public static void JointTransforms(FlameSkeleton skeleton, FlameFrame frame, double[] translations, Quat[] rotations)
        {
            if (translations == null || translations.Length != 3 * FlameSkeleton.JointCount || rotations == null || rotations.Length != FlameSkeleton.JointCount)
                throw new ArgumentException("translations must hold 15 values and rotations 5");
            var headTranslation = GltfHeadTranslation(frame);
            var head = RotationMatrix(frame.HeadRot, 0);
            for (int column = 0; column < 3; column++)
            {
                head[3 + column] = -head[3 + column]; // D R: rows y and z negated
                head[6 + column] = -head[6 + column];
            }
            var matrices = new[] { head, RotationMatrix(frame.NeckPose, 0), RotationMatrix(frame.JawPose, 0), RotationMatrix(frame.EyePose, 0), RotationMatrix(frame.EyePose, 3) };
            rotations[0] = GltfHeadRotation(frame);
            rotations[1] = GltfJointRotation(frame.NeckPose, 0);
            rotations[2] = GltfJointRotation(frame.JawPose, 0);
            rotations[3] = GltfJointRotation(frame.EyePose, 0);
            rotations[4] = GltfJointRotation(frame.EyePose, 3);
            var rest = skeleton.Rest;
            for (int axis = 0; axis < 3; axis++)
                translations[axis] = headTranslation[axis] + head[3 * axis] * rest[0] + head[3 * axis + 1] * rest[1] + head[3 * axis + 2] * rest[2];
            int components = Math.Min(skeleton.ExpCount, frame.Expression.Length);
            var shift = new double[3];
            for (int joint = 1; joint < FlameSkeleton.JointCount; joint++)
            {
                for (int axis = 0; axis < 3; axis++)
                {
                    double sum = 0;
                    int row = (3 * joint + axis) * skeleton.ExpCount;
                    for (int e = 0; e < components; e++) sum += skeleton.ExpBasis[row + e] * frame.Expression[e];
                    shift[axis] = sum;
                }
                int parent = FlameSkeleton.Parents[joint];
                var rotation = matrices[joint];
                for (int axis = 0; axis < 3; axis++)
                {
                    double rotated = rotation[3 * axis] * shift[0] + rotation[3 * axis + 1] * shift[1] + rotation[3 * axis + 2] * shift[2];
                    translations[3 * joint + axis] = rest[3 * joint + axis] - rest[3 * parent + axis] + shift[axis] - rotated;
                }
            }
        }

        /// <summary>A glTF rotation as Unity sees it after glTFast's or UnityGLTF's import (X negated).</summary>
        public static Quat GltfToUnity(Quat q)
        {
            return new Quat(q.X, -q.Y, -q.Z, q.W);
        }

        /// <summary>A glTF position as Unity sees it after import (X negated).</summary>
        public static double[] GltfToUnity(double[] position)
        {
            return new double[] { -position[0], position[1], position[2] };
        }
    }
}
