// Receives the flame-live OSC stream on a background thread and keeps only the newest frame, so that the
// game loop never waits on the network and never falls behind (a late frame is simply replaced).
using System;
using System.Net;
using System.Net.Sockets;
using System.Threading;

namespace FlameLive.Protocol
{
    /// <summary>A receiver that cannot start (port in use, bad address); the message is one line saying what to do.</summary>
    public sealed class FlameLiveException : Exception
    {
        public FlameLiveException(string message) : base(message) { }
    }

    public sealed class FlameLiveListener : IDisposable
    {
        public const int DefaultPort = 9100;
        const int PollMilliseconds = 100;

        readonly Socket socket;
        readonly Thread thread;
        volatile bool stopping;
        FlameFrame newest;
        long frames, rejected;
        string lastRejection, firstRejection;

        /// <summary>Listen on bindAddress:port (127.0.0.1 unless another machine sends the stream).</summary>
        public FlameLiveListener(int port = DefaultPort, string bindAddress = "127.0.0.1")
        {
            if (port < 1 || port > 65535)
                throw new FlameLiveException("port " + port + " is not between 1 and 65535");
            IPAddress address;
            if (!IPAddress.TryParse(bindAddress, out address))
                throw new FlameLiveException("'" + bindAddress + "' is not an IP address to listen on; use 127.0.0.1 (this machine) or 0.0.0.0 (all)");
            socket = new Socket(address.AddressFamily, SocketType.Dgram, ProtocolType.Udp);
            try
            {
                socket.Bind(new IPEndPoint(address, port));
            }
            catch (SocketException error)
            {
                socket.Close();
                if (error.SocketErrorCode == SocketError.AddressAlreadyInUse)
                    throw new FlameLiveException("port " + port + " is already in use (another receiver running?); choose another port and run flame-live with --osc 127.0.0.1:PORT");
                throw new FlameLiveException("cannot listen on " + bindAddress + ":" + port + " (" + error.Message + ")");
            }
            socket.ReceiveTimeout = PollMilliseconds;
            Port = ((IPEndPoint)socket.LocalEndPoint).Port;
            thread = new Thread(Receive) { IsBackground = true, Name = "flame-live OSC receiver" };
            thread.Start();
        }

        /// <summary>The port actually listened on.</summary>
        public int Port { get; private set; }
        /// <summary>Frame bundles received and decoded.</summary>
        public long FramesReceived { get { return Interlocked.Read(ref frames); } }
        /// <summary>Datagrams that were not flame-live's OSC or broke it; see FirstRejection and LastRejection.</summary>
        public long Rejected { get { return Interlocked.Read(ref rejected); } }
        public string FirstRejection { get { return Volatile.Read(ref firstRejection); } }
        public string LastRejection { get { return Volatile.Read(ref lastRejection); } }

        /// <summary>The newest frame received since the last call, or null when none arrived.</summary>
        public FlameFrame TakeNewest()
        {
            return Interlocked.Exchange(ref newest, null);
        }

        void Receive()
        {
            var buffer = new byte[65536];
            EndPoint sender = new IPEndPoint(IPAddress.Any, 0);
            while (!stopping)
            {
                int length;
                try
                {
                    length = socket.ReceiveFrom(buffer, ref sender);
                }
                catch (SocketException)
                {
                    continue; // the poll timeout, or an ICMP error from an earlier send: keep listening
                }
                catch (ObjectDisposedException)
                {
                    return;
                }
                FlameFrame frame;
                string reason;
                switch (FlameOscDecoder.Decode(buffer, length, out frame, out reason))
                {
                    case DecodeResult.Frame:
                        Interlocked.Exchange(ref newest, frame);
                        Interlocked.Increment(ref frames);
                        break;
                    case DecodeResult.Rejected:
                        Interlocked.CompareExchange(ref firstRejection, reason, null);
                        Volatile.Write(ref lastRejection, reason);
                        Interlocked.Increment(ref rejected);
                        break;
                }
            }
        }

        public void Dispose()
        {
            if (stopping) return;
            stopping = true;
            thread.Join(4 * PollMilliseconds);
            socket.Close();
        }
    }
}
