package resume

import (
	"encoding/hex"
	"errors"
	"net"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// NodeID names the gateway that created a session. A gateway with a
// non-zero ServerConfig.NodeID writes it into the last four bytes of
// every session id it creates, so that any gateway of a cluster can tell
// from a RESUME which node holds the session (and its upstream socket)
// without a shared database. The other twelve bytes stay random.
type NodeID [4]byte

// nodeOffset is where a session id carries its NodeID.
const nodeOffset = frame.SessionIDLen - len(NodeID{})

// Node is the node that created the session (zero for a standalone
// gateway's sessions, whose tail is random: see Server.resume).
func (id SessionID) Node() NodeID { return NodeID(id[nodeOffset:]) }

// String is the id in 8 hex digits.
func (n NodeID) String() string { return hex.EncodeToString(n[:]) }

// IsZero reports whether n is the zero NodeID (standalone).
func (n NodeID) IsZero() bool { return n == NodeID{} }

// ForeignResume is a RESUME that arrived at this gateway for a session
// another node created (ServerConfig.Forward).
type ForeignResume struct {
	Node    NodeID // the owner, from the session id
	Session SessionID
	// Conn is the client's link. Forward owns it once it returns nil.
	Conn net.Conn
	// Replay is what was already read from Conn: the preamble, the RESUME
	// frame and any bytes after it. The owner must see them first.
	Replay []byte
	// Binding is the link's TLS channel binding (nil on a tcp link). The
	// owner does not terminate the client's TLS, so it cannot compute it;
	// it needs it to verify the proof (pass it to ServeForwarded).
	Binding []byte
	// Remote is the client's address.
	Remote net.Addr
}

// forwarded is what ServeForwarded knows of a link another node took in.
type forwarded struct {
	binding []byte
}

// ServeForwarded runs the handshake of a link that another node of the
// cluster forwarded here (see ServerConfig.Forward): c carries the
// ForeignResume's Replay and then the client's bytes, binding is its
// Binding, and c.RemoteAddr() should be the client's own address (logs
// and per-source limits use it). Only a RESUME is served: a forwarded
// link cannot open a session, and a RESUME for a session this node does
// not hold is refused, never forwarded again (no loops). It takes
// ownership of c and returns when the link is attached or refused.
func (srv *Server) ServeForwarded(c net.Conn, binding []byte) {
	srv.mu.Lock()
	if srv.isClosed {
		srv.mu.Unlock()
		c.Close()
		return
	}
	srv.wg.Add(1)
	srv.mu.Unlock()
	defer srv.wg.Done()
	srv.handshakeLink(c, &forwarded{binding: binding})
}

// forward hands a RESUME for another node's session to ServerConfig.Forward
// and reports whether it did (false: serve it here, it is ours or nobody's
// to forward). A refusal from Forward is answered with its code at once.
func (srv *Server) forward(c net.Conn, fr *frame.Reader, r *frame.Resume, binding []byte, fwd *forwarded) bool {
	sid := SessionID(r.SessionID)
	node := sid.Node()
	if srv.cfg.Forward == nil || fwd != nil || srv.cfg.NodeID.IsZero() || node == srv.cfg.NodeID {
		return false
	}
	srv.mu.Lock()
	_, local := srv.sessions[sid]
	_, ended := srv.tombs[sid]
	srv.mu.Unlock()
	if local || ended {
		return false // a session handed to this node (or from before clustering) is served here
	}
	replay := frame.AppendPreamble(nil)
	replay = frame.AppendResume(replay, r)
	replay = append(replay, fr.Buffered()...)
	fr.Release()
	c.SetDeadline(time.Time{})
	remote := c.RemoteAddr()
	err := srv.cfg.Forward(&ForeignResume{Node: node, Session: sid, Conn: c, Replay: replay, Binding: binding, Remote: remote})
	if err == nil {
		srv.log.Debug("resume forwarded", "session", sid.String(), "node", node.String(), "remote", remote)
		return true
	}
	code, reason := frame.CodeNotFound, err.Error()
	var e *Error
	if errors.As(err, &e) {
		code, reason = e.Code, e.Reason
	}
	srv.failures.Add(1)
	srv.refused(RefuseResumeForward, code, remote, "resume refused: cannot forward to the owner node",
		"session", sid.String(), "node", node.String(), "reason", reason)
	srv.refuse(c, code, reason)
	return true
}
