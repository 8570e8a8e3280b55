package proxy

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// The gateway cluster's peer layer (docs/cluster.md). Every node keeps one
// QUIC connection to each peer it is configured with (--cluster-peers) and
// forwards a link whose RESUME names another node's session over a new
// stream of that connection: a stream header (the client's address, the
// link's TLS binding), the bytes the handshake had already read, then the
// link's bytes both ways. The owner hands the stream to its session server
// as if the client had dialed it. Session state never leaves its owner.
//
// Peers authenticate each other with a shared key: each side sends an
// HMAC-SHA256, keyed with it, over the connection's TLS exporter, its role
// and its node name. The exporter is unique to one QUIC connection, so a
// recorded exchange proves nothing on another one; the role keeps a node
// from reflecting its peer's proof back. The TLS certificates are
// throw-away self-signed ones: QUIC needs TLS, the key does the trust.

// ClusterALPN is negotiated on peer connections; a connection that did not
// is closed before anything is read from it.
const ClusterALPN = "lifeline-cluster/1"

// MinClusterKey is the shortest shared key accepted, in bytes.
const MinClusterKey = 32

// DefaultForwardTimeout bounds everything a forward waits for before the
// client gets its answer: connecting to the owner, opening a stream and the
// owner's acknowledgement of the stream header. Past it the owner is
// treated as gone (NOT_FOUND), so a dead owner costs a client at most this
// much, never its handshake timeout.
const DefaultForwardTimeout = 2 * time.Second

// NodeID is a gateway's 4-byte node id, the last bytes of the ids of the
// sessions it creates: the first 4 bytes of SHA-256 of its node name.
// Zero is reserved for a standalone gateway.
type NodeID = resume.NodeID

// NodeIDOf returns the node id of name. The zero id (one name in 2^32)
// is reserved: ValidateNodeName refuses a name that hashes to it.
func NodeIDOf(name string) NodeID {
	sum := sha256.Sum256([]byte(name))
	return NodeID(sum[:4])
}

// ValidateNodeName checks a node name: 1 to 255 bytes of printable ASCII
// without spaces, and not hashing to the reserved zero id.
func ValidateNodeName(name string) error {
	if name == "" || len(name) > 255 {
		return fmt.Errorf("node id %q: want 1 to 255 characters", name)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c <= ' ' || c > '~' {
			return fmt.Errorf("node id %q: printable ASCII without spaces only", name)
		}
	}
	if NodeIDOf(name).IsZero() {
		return fmt.Errorf("node id %q hashes to the reserved id 00000000: pick another name", name)
	}
	return nil
}

// ReadClusterKey reads the cluster's shared key from path: the file's
// bytes, leading and trailing white space removed, at least MinClusterKey
// of them. The file must not be readable or writable by other users
// (chmod 600), as the gateway's own key file.
func ReadClusterKey(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("cluster key file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("cluster key file: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("cluster key file %s may be read by other users (mode %04o): chmod 600 it", path, st.Mode().Perm())
	}
	b, err := io.ReadAll(io.LimitReader(f, 1<<16))
	if err != nil {
		return nil, fmt.Errorf("cluster key file: %w", err)
	}
	key := []byte(strings.TrimSpace(string(b)))
	if len(key) < MinClusterKey {
		return nil, fmt.Errorf("cluster key file %s holds %d bytes: want at least %d (e.g. openssl rand -hex 32 > %s)", path, len(key), MinClusterKey, path)
	}
	return key, nil
}

// ClusterConfig configures a node's peer layer.
type ClusterConfig struct {
	// NodeName is this node's name (--node-id); its NodeID is NodeIDOf.
	NodeName string
	// Key is the shared secret of the cluster (at least MinClusterKey
	// bytes).
	Key []byte
	// Listen is the UDP address peers connect to ("" : this node forwards
	// to its peers but takes no forwarded links).
	Listen string
	// Peers are the other nodes' cluster addresses (host:port). This
	// node's own address may be among them: it is recognised and skipped,
	// so every node can be given the same list.
	Peers []string
	// ForwardTimeout: DefaultForwardTimeout if 0.
	ForwardTimeout time.Duration
	// IdleTimeout: a peer connection silent this long is dead (3 s if 0);
	// keep-alives go every third of it. A peer killed without a word is
	// noticed after this long; until then a forward to it fails after
	// ForwardTimeout.
	IdleTimeout time.Duration
	Logger      *slog.Logger
	// Registry, if set, gets the cluster's metrics.
	Registry prometheus.Registerer
}

// Cluster is one node's peer layer: its listener, its connections to the
// other nodes and the links it relays.
type Cluster struct {
	name    string
	id      NodeID
	key     []byte
	timeout time.Duration
	log     *slog.Logger
	m       *clusterMetrics

	tr    *quic.Transport // nil without Listen: dials use dialTr
	ln    *quic.Listener
	udp   *net.UDPConn
	tlsS  *tls.Config
	tlsC  *tls.Config
	qconf *quic.Config

	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine of the cluster

	// serve takes a forwarded link on the owner (Server.ServeForwarded).
	serve atomic.Pointer[func(net.Conn, []byte)]

	mu      sync.Mutex
	peers   []*peer               // one per configured address
	byNode  map[NodeID]*peer      // learned from the peers' handshakes
	inbound map[*quic.Conn]string // authenticated connections from peers, by node name
	closed  bool
}

// peer is one configured peer address and the connection this node keeps
// to it.
type peer struct {
	addr string

	// under Cluster.mu
	conn    *quic.Conn // authenticated and alive; nil otherwise
	name    string     // learned at the first handshake
	id      NodeID
	known   bool // name and id are set
	self    bool // the address is this node's own
	tried   bool // a first attempt has finished
	lastErr error
	tries   chan struct{} // closed and replaced when an attempt finishes
}

// NewCluster starts the peer layer: it listens on cfg.Listen and starts
// connecting to every peer. Links forwarded to this node are refused until
// SetServe is called.
func NewCluster(cfg ClusterConfig) (*Cluster, error) {
	if err := ValidateNodeName(cfg.NodeName); err != nil {
		return nil, err
	}
	if len(cfg.Key) < MinClusterKey {
		return nil, fmt.Errorf("cluster key: %d bytes, want at least %d", len(cfg.Key), MinClusterKey)
	}
	for _, p := range cfg.Peers {
		if err := ValidateHostPort(p); err != nil {
			return nil, fmt.Errorf("cluster peer: %v", err)
		}
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Cluster{
		name: cfg.NodeName, id: NodeIDOf(cfg.NodeName), key: append([]byte(nil), cfg.Key...),
		timeout: cfg.ForwardTimeout, log: log.With("component", "cluster", "node", cfg.NodeName),
		byNode: map[NodeID]*peer{}, inbound: map[*quic.Conn]string{},
	}
	if c.timeout <= 0 {
		c.timeout = DefaultForwardTimeout
	}
	idle := cfg.IdleTimeout
	if idle <= 0 {
		idle = 3 * time.Second
	}
	c.qconf = &quic.Config{
		HandshakeIdleTimeout: c.timeout,
		MaxIdleTimeout:       idle,
		KeepAlivePeriod:      idle / 3,
		// One stream per forwarded link: as many as a gateway has
		// sessions.
		MaxIncomingStreams:    1 << 20,
		MaxIncomingUniStreams: -1,
		// A forwarded link starts with a replay burst: open windows
		// wide from the start rather than through auto-tuning.
		InitialStreamReceiveWindow:     1 << 20,
		InitialConnectionReceiveWindow: 8 << 20,
		MaxConnectionReceiveWindow:     64 << 20,
	}
	cert, err := transport.SelfSignedCert()
	if err != nil {
		return nil, err
	}
	c.tlsS = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{ClusterALPN}, MinVersion: tls.VersionTLS13}
	// The peer's certificate is not checked: the shared key
	// authenticates the connection (clusterAuth), bound to its TLS
	// exporter, which a man in the middle cannot make equal on both
	// sides.
	c.tlsC = &tls.Config{InsecureSkipVerify: true, NextProtos: []string{ClusterALPN}, MinVersion: tls.VersionTLS13, ServerName: "lifeline-cluster"}
	c.m = newClusterMetrics(cfg.Registry, c)

	la := "127.0.0.1:0"
	if cfg.Listen != "" {
		la = cfg.Listen
	}
	ua, err := net.ResolveUDPAddr("udp", la)
	if err != nil {
		return nil, fmt.Errorf("cluster listen: %w", err)
	}
	c.udp, err = net.ListenUDP("udp", ua)
	if err != nil {
		return nil, fmt.Errorf("cluster listen: %w", err)
	}
	// A restarted node resets the connections its previous process had
	// at once, so peers learn of the restart without waiting for their
	// idle timeout.
	var srk quic.StatelessResetKey
	copy(srk[:], c.mac("stateless-reset", nil, []byte(c.name)))
	c.tr = &quic.Transport{Conn: c.udp, StatelessResetKey: &srk}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	if cfg.Listen != "" {
		c.ln, err = c.tr.Listen(c.tlsS, c.qconf)
		if err != nil {
			c.tr.Close()
			c.udp.Close()
			return nil, fmt.Errorf("cluster listen: %w", err)
		}
		c.wg.Add(1)
		go c.acceptConns()
	}
	seen := map[string]bool{}
	for _, a := range cfg.Peers {
		if seen[a] {
			continue
		}
		seen[a] = true
		p := &peer{addr: a, tries: make(chan struct{})}
		c.peers = append(c.peers, p)
		c.wg.Add(1)
		go c.keep(p)
	}
	c.log.Info("cluster node", "node_id", c.id.String(), "listen", c.Addr(), "peers", strings.Join(cfg.Peers, ","))
	return c, nil
}

// ID is this node's id.
func (c *Cluster) ID() NodeID { return c.id }

// Name is this node's name.
func (c *Cluster) Name() string { return c.name }

// Addr is the UDP address peers reach this node on.
func (c *Cluster) Addr() net.Addr { return c.udp.LocalAddr() }

// SetServe sets what takes a link another node forwarded here: the
// session server's ServeForwarded. It must return once the link is
// attached or refused, and owns the link.
func (c *Cluster) SetServe(f func(link net.Conn, binding []byte)) { c.serve.Store(&f) }

// Close closes every peer connection (the links relayed over them end)
// and the listener, and returns when every goroutine has ended.
func (c *Cluster) Close() error {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	if c.ln != nil {
		c.ln.Close()
	}
	c.tr.Close() // closes every connection on it
	c.udp.Close()
	c.wg.Wait()
	return nil
}

// PeerInfo is one configured peer as /cluster reports it.
type PeerInfo struct {
	Addr   string `json:"addr"`
	Node   string `json:"node,omitempty"`    // its name, once learned
	NodeID string `json:"node_id,omitempty"` // its id, once learned
	Up     bool   `json:"up"`
	Self   bool   `json:"self,omitempty"`
	Err    string `json:"error,omitempty"` // why it is down
}

// Peers reports the configured peers, in the order given.
func (c *Cluster) Peers() []PeerInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]PeerInfo, 0, len(c.peers))
	for _, p := range c.peers {
		pi := PeerInfo{Addr: p.addr, Up: p.conn != nil, Self: p.self}
		if p.known {
			pi.Node, pi.NodeID = p.name, p.id.String()
		}
		if p.conn == nil && p.lastErr != nil {
			pi.Err = p.lastErr.Error()
		}
		out = append(out, pi)
	}
	return out
}

// ---- connections to peers ----

// Backoff of a peer's redials: short, so that a restarted peer is back in
// a second, and bounded, so that a dead one costs a dial a second.
const (
	peerRedialMin = 100 * time.Millisecond
	peerRedialMax = time.Second
)

// keep keeps a connection to p until the cluster closes.
func (c *Cluster) keep(p *peer) {
	defer c.wg.Done()
	wait := peerRedialMin
	for c.ctx.Err() == nil {
		qc, name, err := c.dialPeer(p.addr)
		if err == nil {
			err = c.adopt(p, qc, name)
		}
		if err != nil {
			c.attemptDone(p, err)
			if errors.Is(err, errSelf) {
				return
			}
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-c.ctx.Done():
				t.Stop()
			}
			wait = min(wait*2, peerRedialMax)
			continue
		}
		wait = peerRedialMin
		select {
		case <-qc.Context().Done():
		case <-c.ctx.Done():
		}
		c.mu.Lock()
		p.conn = nil
		p.lastErr = fmt.Errorf("connection lost: %w", context.Cause(qc.Context()))
		c.mu.Unlock()
		qc.CloseWithError(0, "closed")
		if c.ctx.Err() == nil {
			c.log.Warn("cluster peer down", "peer", p.addr, "peer_node", name, "err", context.Cause(qc.Context()))
		}
	}
}

var errSelf = errors.New("the address is this node's own")

// attemptDone records a failed attempt to connect to p.
func (c *Cluster) attemptDone(p *peer, err error) {
	c.mu.Lock()
	first := !p.tried || p.lastErr == nil || p.lastErr.Error() != err.Error()
	p.tried = true
	p.lastErr = err
	if errors.Is(err, errSelf) {
		p.self = true
	}
	close(p.tries)
	p.tries = make(chan struct{})
	c.mu.Unlock()
	switch {
	case errors.Is(err, errSelf):
		c.log.Debug("cluster peer is this node: skipped", "peer", p.addr)
	case errors.Is(err, errCollision):
		c.log.Error("cluster peer refused", "peer", p.addr, "err", err)
	case first && c.ctx.Err() == nil:
		// Logged when the reason changes, not at every redial.
		c.log.Warn("cluster peer unreachable", "peer", p.addr, "err", err)
	}
}

var errCollision = errors.New("node id collision")

// adopt makes qc, authenticated as node name, p's connection, unless its
// node id collides with this node's or another peer's.
func (c *Cluster) adopt(p *peer, qc *quic.Conn, name string) error {
	id := NodeIDOf(name)
	c.mu.Lock()
	var err error
	switch {
	case c.closed:
		err = net.ErrClosed
	case name == c.name:
		err = errSelf
	case id == c.id:
		err = fmt.Errorf("%w: peer %s is node %q, whose id %s is this node's (%q): give one of them another --node-id", errCollision, p.addr, name, id, c.name)
	default:
		if o := c.byNode[id]; o != nil && o != p && o.name != name {
			err = fmt.Errorf("%w: peer %s is node %q, whose id %s is also that of node %q at %s: give one of them another --node-id", errCollision, p.addr, name, id, o.name, o.addr)
		}
	}
	if err != nil {
		c.mu.Unlock()
		qc.CloseWithError(clusterCodeRefused, "refused")
		return err
	}
	if p.known && p.id != id && c.byNode[p.id] == p {
		delete(c.byNode, p.id) // another node now answers at this address
	}
	p.conn, p.name, p.id, p.known, p.tried, p.lastErr = qc, name, id, true, true, nil
	c.byNode[id] = p
	close(p.tries)
	p.tries = make(chan struct{})
	c.mu.Unlock()
	c.log.Info("cluster peer up", "peer", p.addr, "peer_node", name, "peer_node_id", id.String())
	return nil
}

// Application error codes on peer connections.
const (
	clusterCodeClosed  quic.ApplicationErrorCode = 0
	clusterCodeAuth    quic.ApplicationErrorCode = 1 // authentication failed
	clusterCodeRefused quic.ApplicationErrorCode = 2 // node id collision, or this node itself
	clusterCodeALPN    quic.ApplicationErrorCode = 3
)

// dialPeer connects to addr and runs the authentication; it returns the
// peer's node name.
func (c *Cluster) dialPeer(addr string) (*quic.Conn, string, error) {
	ctx, cancel := context.WithTimeout(c.ctx, c.timeout)
	defer cancel()
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, "", err
	}
	qc, err := c.tr.Dial(ctx, ua, c.tlsC, c.qconf)
	if err != nil {
		return nil, "", err
	}
	name, err := c.authDialer(ctx, qc)
	if err != nil {
		qc.CloseWithError(clusterCodeAuth, "authentication failed")
		return nil, "", err
	}
	return qc, name, nil
}

// ---- authentication ----

// The auth exchange, on the first stream the dialer opens:
//
//	dialer:   "LLCA" version(1) nameLen(1) name mac(32)
//	listener: status(1) nameLen(1) name mac(32)    status 0: accepted
//	          status(1) reasonLen(1) reason         otherwise, then close
//
// mac = HMAC-SHA256(key, "lifeline cluster auth v1" 0 role 0 exporter name)
// with role "dialer" or "listener" and exporter 32 bytes of the QUIC
// connection's TLS exporter (label clusterExporterLabel).
const (
	authMagic            = "LLCA"
	authVersion          = 1
	clusterExporterLabel = "EXPORTER-lifeline-cluster-auth"
	roleDialer           = "dialer"
	roleListener         = "listener"
)

// mac is HMAC-SHA256 over the purpose, the role, the exporter and the
// name, each but the last followed by a zero byte so that no two inputs
// run together.
func (c *Cluster) mac(role string, exporter, name []byte) []byte {
	return clusterMAC(c.key, role, exporter, name)
}

func clusterMAC(key []byte, role string, exporter, name []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("lifeline cluster auth v1\x00"))
	m.Write([]byte(role))
	m.Write([]byte{0})
	m.Write(exporter)
	m.Write([]byte{0})
	m.Write(name)
	return m.Sum(nil)
}

func exporterOf(qc *quic.Conn) ([]byte, error) {
	cs := qc.ConnectionState().TLS
	if cs.NegotiatedProtocol != ClusterALPN {
		return nil, fmt.Errorf("peer did not negotiate %s (got %q): not a lifeline cluster port", ClusterALPN, cs.NegotiatedProtocol)
	}
	return cs.ExportKeyingMaterial(clusterExporterLabel, nil, 32)
}

// authDialerMsg is the dialer's message for exporter.
func authDialerMsg(key []byte, exporter []byte, name string) []byte {
	b := append([]byte(authMagic), authVersion, byte(len(name)))
	b = append(b, name...)
	return append(b, clusterMAC(key, roleDialer, exporter, []byte(name))...)
}

func (c *Cluster) authDialer(ctx context.Context, qc *quic.Conn) (string, error) {
	exp, err := exporterOf(qc)
	if err != nil {
		return "", err
	}
	str, err := qc.OpenStreamSync(ctx)
	if err != nil {
		return "", err
	}
	defer str.Close()
	if d, ok := ctx.Deadline(); ok {
		str.SetDeadline(d)
	}
	if _, err := str.Write(authDialerMsg(c.key, exp, c.name)); err != nil {
		return "", err
	}
	var hdr [2]byte
	if _, err := io.ReadFull(str, hdr[:]); err != nil {
		return "", fmt.Errorf("no answer to authentication: %w", err)
	}
	body := make([]byte, int(hdr[1]))
	if _, err := io.ReadFull(str, body); err != nil {
		return "", err
	}
	if hdr[0] != 0 {
		return "", fmt.Errorf("peer refused this node: %s", body)
	}
	var mac [32]byte
	if _, err := io.ReadFull(str, mac[:]); err != nil {
		return "", err
	}
	if !hmac.Equal(mac[:], clusterMAC(c.key, roleListener, exp, body)) {
		return "", errors.New("peer failed authentication (not the same --cluster-key-file)")
	}
	return string(body), nil
}

// authListener runs the listener's half on the first stream of qc and
// returns the dialer's node name.
func (c *Cluster) authListener(qc *quic.Conn) (string, error) {
	exp, err := exporterOf(qc)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(c.ctx, c.timeout)
	defer cancel()
	str, err := qc.AcceptStream(ctx)
	if err != nil {
		return "", fmt.Errorf("no authentication: %w", err)
	}
	defer str.Close()
	d, _ := ctx.Deadline()
	str.SetDeadline(d)
	var hdr [6]byte
	if _, err := io.ReadFull(str, hdr[:]); err != nil {
		return "", fmt.Errorf("authentication: %w", err)
	}
	if string(hdr[:4]) != authMagic || hdr[4] != authVersion || hdr[5] == 0 {
		return "", errors.New("authentication: not a lifeline cluster peer, or another version")
	}
	name := make([]byte, int(hdr[5]))
	var mac [32]byte
	if _, err := io.ReadFull(str, name); err != nil {
		return "", err
	}
	if _, err := io.ReadFull(str, mac[:]); err != nil {
		return "", err
	}
	if !hmac.Equal(mac[:], clusterMAC(c.key, roleDialer, exp, name)) {
		refuse := "authentication failed"
		str.Write(append([]byte{1, byte(len(refuse))}, refuse...))
		return "", errors.New("peer failed authentication (wrong cluster key, or a proof replayed from another connection)")
	}
	if err := ValidateNodeName(string(name)); err != nil {
		return "", err
	}
	// Authenticated: a collision is a configuration error of ours too.
	id := NodeIDOf(string(name))
	var refuse string
	c.mu.Lock()
	if id == c.id && string(name) != c.name {
		refuse = fmt.Sprintf("node %q has id %s, as node %q does: give one of them another --node-id", name, id, c.name)
	} else if o := c.byNode[id]; o != nil && o.name != string(name) {
		refuse = fmt.Sprintf("node %q has id %s, as node %q does: give one of them another --node-id", name, id, o.name)
	}
	c.mu.Unlock()
	if refuse != "" {
		str.Write(append([]byte{2, byte(min(len(refuse), 255))}, refuse[:min(len(refuse), 255)]...))
		return "", fmt.Errorf("%w: %s", errCollision, refuse)
	}
	out := append([]byte{0, byte(len(c.name))}, c.name...)
	out = append(out, clusterMAC(c.key, roleListener, exp, []byte(c.name))...)
	if _, err := str.Write(out); err != nil {
		return "", err
	}
	return string(name), nil
}

// acceptConns takes peer connections until the cluster closes.
func (c *Cluster) acceptConns() {
	defer c.wg.Done()
	for {
		qc, err := c.ln.Accept(c.ctx)
		if err != nil {
			if c.ctx.Err() == nil {
				c.log.Error("cluster listener stopped", "err", err)
			}
			return
		}
		c.wg.Add(1)
		go c.servePeer(qc)
	}
}

// servePeer authenticates an inbound connection and then takes the links
// it forwards, one per stream, until it ends.
func (c *Cluster) servePeer(qc *quic.Conn) {
	defer c.wg.Done()
	name, err := c.authListener(qc)
	if err != nil {
		code := clusterCodeAuth
		if errors.Is(err, errCollision) {
			code = clusterCodeRefused
			c.log.Error("cluster peer refused", "remote", qc.RemoteAddr(), "err", err)
		} else {
			c.log.Warn("cluster peer refused", "remote", qc.RemoteAddr(), "err", err)
		}
		c.m.authFailed.Inc()
		// Give the refusal a moment to reach the peer before the
		// connection's close overtakes it.
		t := time.NewTimer(100 * time.Millisecond)
		select {
		case <-t.C:
		case <-c.ctx.Done():
			t.Stop()
		}
		qc.CloseWithError(code, "refused")
		return
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		qc.CloseWithError(clusterCodeClosed, "closing")
		return
	}
	c.inbound[qc] = name
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.inbound, qc)
		c.mu.Unlock()
	}()
	c.log.Debug("cluster peer connected", "remote", qc.RemoteAddr(), "peer_node", name)
	for {
		str, err := qc.AcceptStream(c.ctx)
		if err != nil {
			qc.CloseWithError(clusterCodeClosed, "closing")
			return
		}
		c.wg.Add(1)
		go c.takeForwarded(qc, str, name)
	}
}

// ---- forwarded links ----

// Status bytes the owner answers a forward header with.
const (
	fwdAccepted = 0
	fwdNotMine  = 1 // the header names another node
	fwdNoServer = 2 // this node takes no forwarded links (not serving yet, or closing)
)

// takeForwarded reads the header of a forwarded link and hands the link to
// the session server.
func (c *Cluster) takeForwarded(qc *quic.Conn, str *quic.Stream, from string) {
	defer c.wg.Done()
	str.SetReadDeadline(time.Now().Add(c.timeout))
	h, err := readForwardHeader(str)
	if err != nil {
		c.log.Warn("forwarded link refused", "peer_node", from, "err", err)
		str.CancelRead(fwdStreamCode)
		str.CancelWrite(fwdStreamCode)
		return
	}
	str.SetReadDeadline(time.Time{})
	serve := c.serve.Load()
	status := byte(fwdAccepted)
	switch {
	case h.Owner != c.id:
		status = fwdNotMine
	case serve == nil:
		status = fwdNoServer
	}
	str.SetWriteDeadline(time.Now().Add(c.timeout))
	_, err = str.Write([]byte{status})
	str.SetWriteDeadline(time.Time{})
	if status != fwdAccepted || err != nil {
		str.Close()
		str.CancelRead(fwdStreamCode)
		return
	}
	c.m.forwardedIn.Inc()
	link := &fwdConn{str: str, local: qc.LocalAddr(), remote: h.Remote, peer: qc.RemoteAddr()}
	(*serve)(link, h.Binding)
}

// fwdStreamCode cancels a forwarded link's stream.
const fwdStreamCode quic.StreamErrorCode = 0x100

// ForwardTo forwards a link to its session's owner: conn is the client's
// link, replay what the handshake already read from it, remote the
// client's address and binding the link's TLS channel binding. It returns
// nil once the owner has taken the stream; from then on the cluster owns
// conn, relays it to the owner and closes it when either side closes. An
// error (*ErrOwnerGone) means the owner cannot be reached now: the caller
// still owns conn.
func (c *Cluster) ForwardTo(owner NodeID, conn net.Conn, replay []byte, remote net.Addr, binding []byte) error {
	start := time.Now()
	deadline := start.Add(c.timeout)
	qc, err := c.connFor(owner, deadline)
	if err != nil {
		c.m.forwardFailed.Inc()
		return err
	}
	ctx, cancel := context.WithDeadline(c.ctx, deadline)
	defer cancel()
	str, err := qc.OpenStreamSync(ctx)
	if err != nil {
		c.m.forwardFailed.Inc()
		return &OwnerGoneError{Node: owner, Err: fmt.Errorf("open stream: %w", err)}
	}
	str.SetDeadline(deadline)
	hdr, err := appendForwardHeader(nil, forwardHeader{Owner: owner, Remote: remote, Binding: binding})
	if err == nil {
		_, err = str.Write(append(hdr, replay...))
	}
	var status [1]byte
	if err == nil {
		_, err = io.ReadFull(str, status[:])
	}
	if err == nil && status[0] != fwdAccepted {
		err = fmt.Errorf("owner answered %d", status[0])
		if status[0] == fwdNotMine {
			err = errors.New("the node at that address has another id now")
		}
	}
	if err != nil {
		str.CancelRead(fwdStreamCode)
		str.CancelWrite(fwdStreamCode)
		c.m.forwardFailed.Inc()
		return &OwnerGoneError{Node: owner, Err: err}
	}
	str.SetDeadline(time.Time{})
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		str.CancelRead(fwdStreamCode)
		str.CancelWrite(fwdStreamCode)
		return &OwnerGoneError{Node: owner, Err: net.ErrClosed}
	}
	c.wg.Add(1)
	c.mu.Unlock()
	c.m.forwardedOut.Inc()
	c.m.forwardLatency.Observe(time.Since(start).Seconds())
	go func() {
		defer c.wg.Done()
		c.relay(conn, str)
	}()
	return nil
}

// OwnerGoneError is a forward that could not reach the session's owner.
type OwnerGoneError struct {
	Node NodeID
	Err  error
}

func (e *OwnerGoneError) Error() string {
	return fmt.Sprintf("owner node %s is gone: %v", e.Node, e.Err)
}

func (e *OwnerGoneError) Unwrap() error { return e.Err }

// connFor returns the live connection to node, waiting until deadline only
// while peers whose ids are not known yet are being tried for the first
// time. A node known to be down is answered at once.
func (c *Cluster) connFor(node NodeID, deadline time.Time) (*quic.Conn, error) {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	for {
		c.mu.Lock()
		if p := c.byNode[node]; p != nil {
			qc, err := p.conn, p.lastErr
			c.mu.Unlock()
			if qc != nil {
				return qc, nil
			}
			return nil, &OwnerGoneError{Node: node, Err: fmt.Errorf("peer %s is down: %v", p.addr, err)}
		}
		// Unknown: one of the peers not yet reached may be it.
		var wait []chan struct{}
		for _, p := range c.peers {
			if !p.known && !p.self && !p.tried {
				wait = append(wait, p.tries)
			}
		}
		c.mu.Unlock()
		if len(wait) == 0 {
			return nil, &OwnerGoneError{Node: node, Err: errors.New("no configured peer has that id")}
		}
		select {
		case <-wait[0]:
		case <-t.C:
			return nil, &OwnerGoneError{Node: node, Err: errors.New("no reachable peer has that id")}
		case <-c.ctx.Done():
			return nil, &OwnerGoneError{Node: node, Err: net.ErrClosed}
		}
	}
}

// relayGrace is how long a relay waits, once one direction has ended, for
// the other to end on its own before it closes both: the owner's last
// frames (a REJECT, a RESET) reach the client before its link closes, but
// a client that went silent does not hold the stream.
const relayGrace = 2 * time.Second

// relay copies between the client's link a and the owner's stream b until
// both directions end, then closes both. An end of stream (FIN) is passed
// on as one; an error resets the other side.
func (c *Cluster) relay(a net.Conn, b *quic.Stream) {
	up, down := make(chan struct{}), make(chan struct{})
	c.wg.Add(2)
	go func() { // client -> owner
		defer c.wg.Done()
		defer close(up)
		n, err := copyBuf(b, a)
		c.m.bytesOut.Add(float64(n))
		if err == nil {
			b.Close()
		} else {
			b.CancelWrite(fwdStreamCode)
		}
	}()
	go func() { // owner -> client
		defer c.wg.Done()
		defer close(down)
		n, err := copyBuf(a, b)
		c.m.bytesIn.Add(float64(n))
		if cw, ok := a.(interface{ CloseWrite() error }); ok && err == nil {
			cw.CloseWrite()
		}
	}()
	select {
	case <-up:
	case <-down:
	case <-c.ctx.Done():
	}
	t := time.NewTimer(relayGrace)
	for up != nil || down != nil {
		select {
		case <-up:
			up = nil
			continue
		case <-down:
			down = nil
			continue
		case <-t.C:
		case <-c.ctx.Done():
		}
		break
	}
	t.Stop()
	a.Close()
	b.CancelRead(fwdStreamCode)
	b.CancelWrite(fwdStreamCode)
	if up != nil {
		<-up
	}
	if down != nil {
		<-down
	}
}

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

// copyBuf is io.CopyBuffer with a pooled buffer; a clean EOF is nil.
func copyBuf(dst io.Writer, src io.Reader) (int64, error) {
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	return io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, *bp)
}

// fwdConn is a forwarded link on its owner: the stream, seen as a
// connection from the client.
type fwdConn struct {
	str    *quic.Stream
	local  net.Addr
	remote net.Addr // the client's real address
	peer   net.Addr // the entry node

	closed  atomic.Bool
	mu      sync.Mutex
	writing int
}

func (f *fwdConn) Read(p []byte) (int, error) {
	n, err := f.str.Read(p)
	if err != nil && f.closed.Load() {
		err = net.ErrClosed
	}
	return n, err
}

func (f *fwdConn) Write(p []byte) (int, error) {
	f.mu.Lock()
	if f.closed.Load() {
		f.mu.Unlock()
		return 0, net.ErrClosed
	}
	f.writing++
	f.mu.Unlock()
	n, err := f.str.Write(p)
	f.mu.Lock()
	f.writing--
	f.mu.Unlock()
	if err != nil && f.closed.Load() {
		err = net.ErrClosed
	}
	return n, err
}

// Close sends FIN after what was written (a reset if a Write is blocked,
// which only a reset unblocks) and stops reading: the entry node's relay
// reads our last bytes and the FIN before its own writes fail.
func (f *fwdConn) Close() error {
	f.mu.Lock()
	if f.closed.Swap(true) {
		f.mu.Unlock()
		return nil
	}
	busy := f.writing > 0
	f.mu.Unlock()
	f.str.SetReadDeadline(time.Unix(1, 0))
	if busy {
		f.str.CancelWrite(fwdStreamCode)
	} else {
		f.str.Close()
	}
	f.str.CancelRead(fwdStreamCode)
	return nil
}

func (f *fwdConn) LocalAddr() net.Addr  { return f.local }
func (f *fwdConn) RemoteAddr() net.Addr { return f.remote }
func (f *fwdConn) SetDeadline(t time.Time) error {
	f.SetReadDeadline(t)
	return f.SetWriteDeadline(t)
}

func (f *fwdConn) SetReadDeadline(t time.Time) error {
	if f.closed.Load() {
		return nil
	}
	return f.str.SetReadDeadline(t)
}
func (f *fwdConn) SetWriteDeadline(t time.Time) error { return f.str.SetWriteDeadline(t) }

// ---- metrics ----

type clusterMetrics struct {
	forwardedOut, forwardedIn, forwardFailed, authFailed prometheus.Counter
	bytesOut, bytesIn                                    prometheus.Counter
	forwardLatency                                       prometheus.Histogram
}

func newClusterMetrics(reg prometheus.Registerer, c *Cluster) *clusterMetrics {
	m := &clusterMetrics{
		forwardedOut: prometheus.NewCounter(prometheus.CounterOpts{Name: "lifeline_cluster_forwarded_links_total",
			Help: "Links forwarded between cluster nodes: out, a resume for another node's session sent to its owner; in, one taken from a peer.", ConstLabels: prometheus.Labels{"direction": "out"}}),
		forwardedIn: prometheus.NewCounter(prometheus.CounterOpts{Name: "lifeline_cluster_forwarded_links_total",
			Help: "Links forwarded between cluster nodes: out, a resume for another node's session sent to its owner; in, one taken from a peer.", ConstLabels: prometheus.Labels{"direction": "in"}}),
		forwardFailed: prometheus.NewCounter(prometheus.CounterOpts{Name: "lifeline_cluster_forward_failures_total",
			Help: "Resumes for another node's session refused with NOT_FOUND because the owner could not be reached."}),
		authFailed: prometheus.NewCounter(prometheus.CounterOpts{Name: "lifeline_cluster_peer_refusals_total",
			Help: "Inbound peer connections refused: failed authentication, or a node id collision."}),
		bytesOut: prometheus.NewCounter(prometheus.CounterOpts{Name: "lifeline_cluster_relayed_bytes_total",
			Help: "Bytes relayed on forwarded links, client to owner (out) and owner to client (in).", ConstLabels: prometheus.Labels{"direction": "out"}}),
		bytesIn: prometheus.NewCounter(prometheus.CounterOpts{Name: "lifeline_cluster_relayed_bytes_total",
			Help: "Bytes relayed on forwarded links, client to owner (out) and owner to client (in).", ConstLabels: prometheus.Labels{"direction": "in"}}),
		forwardLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "lifeline_cluster_forward_seconds",
			Help: "Time to hand a link to its owner (stream open, header and the owner's acknowledgement).", Buckets: prometheus.ExponentialBuckets(0.0001, 4, 9)}),
	}
	if reg != nil {
		reg.MustRegister(m.forwardedOut, m.forwardedIn, m.forwardFailed, m.authFailed, m.bytesOut, m.bytesIn, m.forwardLatency,
			peerCollector{c})
	}
	return m
}

var peerUpDesc = prometheus.NewDesc("lifeline_cluster_peer_up", "1 while the connection to a configured peer is up and authenticated, 0 otherwise.",
	[]string{"peer", "peer_node_id"}, nil)

// peerCollector reports each configured peer's state when scraped.
type peerCollector struct{ c *Cluster }

func (pc peerCollector) Describe(ch chan<- *prometheus.Desc) { ch <- peerUpDesc }

func (pc peerCollector) Collect(ch chan<- prometheus.Metric) {
	ps := pc.c.Peers()
	sort.Slice(ps, func(i, j int) bool { return ps[i].Addr < ps[j].Addr })
	for _, p := range ps {
		if p.Self {
			continue
		}
		v := 0.0
		if p.Up {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(peerUpDesc, prometheus.GaugeValue, v, p.Addr, p.NodeID)
	}
}

// forward is the gateway's resume.ServerConfig.Forward: a RESUME for
// another node's session goes to its owner, or is refused with NOT_FOUND
// at once when the owner cannot be reached.
func (c *Cluster) forward(f *resume.ForeignResume) error {
	err := c.ForwardTo(f.Node, f.Conn, f.Replay, f.Remote, f.Binding)
	if err != nil {
		return &resume.Error{Code: frame.CodeNotFound, Reason: err.Error()}
	}
	c.log.Debug("link forwarded", "session", f.Session.String(), "owner", f.Node.String(), "remote", f.Remote)
	return nil
}
