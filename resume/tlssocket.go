package resume

import (
	"crypto/tls"
	"net"
	"sync/atomic"
	"syscall"
)

// TLSSocket returns c, the TCP socket a TLS link is about to run over,
// made ready for the link's reader to park in the shared poller while the
// link is idle, as a TCP link's reader does: no goroutine and no
// read-ahead buffer per idle link. Pass the result to tls.Client or
// tls.Server in place of c; the link finds it through
// (*tls.Conn).NetConn. c is a *net.TCPConn or a LinkSocket (a PROXY
// protocol connection); any other c is returned as it is, and its link's
// reader waits in a goroutine.
//
// Why a wrapper: a *tls.Conn may hold a decrypted record or the start of
// the next one, which the socket's readiness does not show, so the reader
// cannot wait on the socket alone. It reads once through the *tls.Conn
// with the socket's reads told not to wait; only when the socket has
// nothing (the TLS layer has nothing either: it asked for more) does the
// reader park. That read then fails with a temporary net.Error, which
// leaves the *tls.Conn usable with any partial record kept.
func TLSSocket(c net.Conn) net.Conn {
	if !sharedPollerOK {
		return c
	}
	switch sc := c.(type) {
	case *net.TCPConn:
		ts := &tlsSocket{Conn: c}
		if !ts.use(sc) {
			return c
		}
		return ts
	case LinkSocket:
		// Its socket is known once the layer has given up what it read
		// ahead, after the handshake (socket).
		return &tlsSocket{Conn: c, ls: sc}
	}
	return c
}

type tlsSocket struct {
	// Conn is what crypto/tls reads and writes: the socket, or a
	// LinkSocket over it.
	net.Conn
	ls LinkSocket // nil for a bare socket
	// tc and rc are the socket, once known (set before the link's
	// reader starts, read only by it).
	tc *net.TCPConn
	rc syscall.RawConn
	// nowait: reads return errNoData rather than wait (the link's
	// reader sets it around one read, SetIdleProbe).
	nowait atomic.Bool
}

func (c *tlsSocket) use(tc *net.TCPConn) bool {
	rc, err := tc.SyscallConn()
	if err != nil {
		return false
	}
	c.tc, c.rc = tc, rc
	return true
}

// socket reports whether the socket is known, asking a LinkSocket for it.
func (c *tlsSocket) socket() bool {
	if c.rc != nil {
		return true
	}
	if c.ls == nil {
		return false
	}
	tc := c.ls.Socket()
	return tc != nil && c.use(tc)
}

func (c *tlsSocket) Read(p []byte) (int, error) {
	if !c.nowait.Load() {
		return c.Conn.Read(p)
	}
	n, ready, err := readNow(c.tc, c.rc, p)
	if !ready {
		return 0, errNoData
	}
	return n, err
}

// errNoData is a read told not to wait that found the socket empty.
// Temporary, so that crypto/tls does not make it the connection's
// permanent error.
var errNoData net.Error = noData{}

type noData struct{}

func (noData) Error() string   { return "resume: nothing to read on the socket now" }
func (noData) Timeout() bool   { return false }
func (noData) Temporary() bool { return true }

// tlsIdle sets up the idle wait of a TLS link's frame reader, if the
// link runs over a TLSSocket.
func (l *link) tlsIdle(conn net.Conn) {
	tc, ok := conn.(*tls.Conn)
	if !ok {
		return
	}
	ts, ok := tc.NetConn().(*tlsSocket)
	if !ok || !ts.socket() {
		return
	}
	l.fr.SetIdleProbe(ts.nowait.Store, func(err error) bool { return err == errNoData })
	l.fr.SetIdleWait(func() error { return l.idleWait(ts.rc) })
}
