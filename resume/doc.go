// Package resume is lifeline's resumable session engine: a byte stream
// between a client and a gateway that survives any number of broken links,
// with no byte lost, duplicated or reordered, and that fails loudly (an
// *Error with a protocol code) when it truly cannot continue.
//
// A session is two byte streams, each with a replay buffer on the sending
// side: bytes stay there until the peer acknowledges them. A link is any
// ordered byte transport (TCP, TLS, a QUIC stream) wrapped as a net.Conn.
// When a link fails, the gateway parks the session (DISCONNECTED) and the
// client dials a new link, proves it holds the session's credential, and
// both sides resend what the other lacks. docs/protocol.md is the wire
// specification.
//
// The client side is Dial, which takes a DialFunc so that any transport
// fits; the gateway side is a Server fed with links by Serve or ServeLink.
// Both hand out a *Conn: a net.Conn with CloseWrite, Reset, the session's
// id, state and counters.
//
//	srv, _ := resume.NewServer(resume.DefaultServerConfig())
//	go srv.Serve(listener)
//	go func() {
//		for {
//			conn, err := srv.Accept()
//			if err != nil {
//				return
//			}
//			go handle(conn) // a net.Conn whose stream survives link failures
//		}
//	}()
//
//	dial := func(ctx context.Context) (net.Conn, error) {
//		var d net.Dialer
//		return d.DialContext(ctx, "tcp", "gw.example.net:7000")
//	}
//	conn, err := resume.Dial(ctx, dial, "redis", resume.DefaultConfig())
//
// States are those of docs/protocol.md §5.4: CONNECTING, ACTIVE,
// DISCONNECTED (GameLift Streams' PENDING_CLIENT_RECONNECTION, see §9),
// RECONNECTING, CLOSED. Every transition goes through one function and is
// logged with its cause.
package resume
