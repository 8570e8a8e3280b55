package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"

	"github.com/lifeline-proxy/lifeline/proxy"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// In-place upgrades (kill -USR2, issue 12; docs/operations.md "Upgrading
// in place"). tableflip starts the binary now installed at the path this
// process was started from (os.Args[0], looked up as at start: the file
// at that path, not this process's own image), with the same arguments,
// and passes it every listening socket; the sessions go over a Unix
// socket pair of our own (proxy/handover.go), whose new-process end
// travels to it as one more inherited file.

// upgradesEnabled is set by main: only the real binary re-executes
// itself. Tests that call run in-process do not (tableflip allows one
// upgrader per process, and re-executing the test binary is no upgrade).
var upgradesEnabled bool

// handoverFile names the hand-over socket among the inherited files.
const handoverFile = "lifeline-handover"

// Timeouts of an upgrade. handoverTimeout bounds each wait for the other
// process (the new one's start up to its HELLO, its OK, its DONE; the
// old one's sessions); freezeWait bounds the old process's freeze (a
// session opening, an upstream connect in progress); upgradeTimeout is
// tableflip's bound on the whole (the new process's readiness).
const (
	handoverTimeout = 10 * time.Second
	freezeWait      = 8 * time.Second
	pauseWait       = 2 * time.Second
	upgradeTimeout  = 45 * time.Second
	exitWait        = 5 * time.Second
)

// refuseEnv, set to 1 in a new process's environment, makes it refuse
// the sessions it is handed (tests of the rollback).
const refuseEnv = "LIFELINE_TEST_REFUSE_SNAPSHOT"

// upgrader is the process's part in upgrades: the listeners it may share
// with a new process, and, in a new process, the socket to the old one.
type upgrader struct {
	upg *tableflip.Upgrader
	log *slog.Logger

	mu        sync.Mutex
	listeners []*sharedListener
	seq       map[string]int
	parent    *net.UnixConn // the old process (this one is the new one)
}

// sharedListener is a listener the next process inherits.
type sharedListener struct {
	pausable
	kind string // "link", "app" or "admin"
}

// pausable is a listener a hand-over stops and starts again.
type pausable interface {
	net.Listener
	Pause(wait time.Duration) error
	Resume()
}

// procUpgrader is the running proxy's, nil when upgrades are off.
var procUpgrader *upgrader

// startUpgrader sets up upgrades for this process (nil when they are
// off, or tableflip cannot run here: then USR2 is logged and ignored).
func startUpgrader(log *slog.Logger) (*upgrader, error) {
	if !upgradesEnabled {
		return nil, nil
	}
	upg, err := tableflip.New(tableflip.Options{UpgradeTimeout: upgradeTimeout})
	if errors.Is(err, tableflip.ErrNotSupported) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("upgrades: %w", err)
	}
	u := &upgrader{upg: upg, log: log, seq: map[string]int{}}
	if upg.HasParent() {
		f, err := upg.Fds.File(handoverFile)
		if err != nil {
			return nil, fmt.Errorf("upgrade: hand-over socket: %w", err)
		}
		if f != nil {
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				return nil, fmt.Errorf("upgrade: hand-over socket: %w", err)
			}
			u.parent = c.(*net.UnixConn)
		}
	}
	procUpgrader = u
	return u, nil
}

// child reports whether this process is the new one of an upgrade.
func (u *upgrader) child() bool { return u != nil && u.parent != nil }

// listen opens (or, in a new process, inherits) the TCP listener of the
// given kind at addr. A new process's listeners start paused: it takes
// no connection before it holds the old one's sessions.
func listenShared(kind, network, addr string) (net.Listener, error) {
	u := procUpgrader
	if u == nil {
		return net.Listen(network, addr)
	}
	key := u.key(kind, addr)
	ln, err := u.upg.Fds.ListenWithCallback(network, key, func(network, _ string) (net.Listener, error) {
		return net.Listen(network, addr)
	})
	if err != nil {
		return nil, err
	}
	sl := &sharedListener{proxy.NewPausableListener(ln), kind}
	if u.child() {
		sl.Pause(0) // nothing accepts yet: it returns at once, paused
	}
	u.add(sl)
	return sl, nil
}

// key names a listener among the inherited files: by kind and rank, not
// only the address, since "127.0.0.1:0" may name the admin listener and a
// link listener alike.
func (u *upgrader) key(kind, addr string) string {
	u.mu.Lock()
	defer u.mu.Unlock()
	k := fmt.Sprintf("%s#%d|%s", kind, u.seq[kind], addr)
	u.seq[kind]++
	return k
}

func (u *upgrader) add(l *sharedListener) {
	u.mu.Lock()
	u.listeners = append(u.listeners, l)
	u.mu.Unlock()
}

// listenLink opens a gateway's link listener (transport.Listen) so that
// the next process can inherit it: a tcp or tls listener's socket comes
// through listenShared; a quic listener's UDP socket is inherited too,
// but QUIC state is per process, so the listener on it stops (its
// connections closed: clients redial) while the sessions go over, and
// the new process starts its own only once it has them.
func listenLink(cfg transport.Config) (net.Listener, error) {
	u := procUpgrader
	if u == nil {
		return transport.Listen(cfg)
	}
	if cfg.Name != "quic" {
		cfg.ListenTCP = linkListen
		return transport.Listen(cfg)
	}
	pc, err := u.upg.Fds.ListenPacketWithCallback("udp", u.key("link", cfg.Addr), func(network, _ string) (net.PacketConn, error) {
		ua, err := net.ResolveUDPAddr(network, cfg.Addr)
		if err != nil {
			return nil, err
		}
		return net.ListenUDP(network, ua)
	})
	if err != nil {
		return nil, err
	}
	udp, ok := pc.(*net.UDPConn)
	if !ok {
		pc.Close()
		return nil, fmt.Errorf("inherited %s is a %T, not UDP", cfg.Addr, pc)
	}
	// Our own copy of the socket: each start makes a *net.UDPConn of
	// it, which the QUIC listener closes when it stops.
	f, err := udp.File()
	addr := udp.LocalAddr()
	udp.Close()
	if err != nil {
		return nil, err
	}
	q := &quicShared{cfg: cfg, file: f, addr: addr, wake: make(chan struct{}), closed: make(chan struct{}), parked: make(chan struct{}, 1)}
	if !u.child() {
		if err := q.start(); err != nil {
			f.Close()
			return nil, err
		}
	}
	u.add(&sharedListener{q, "link"})
	return q, nil
}

// quicShared is a quic link listener that can stop and start again on
// the same UDP socket.
type quicShared struct {
	cfg  transport.Config
	file *os.File
	addr net.Addr

	mu     sync.Mutex
	inner  net.Listener  // nil while stopped
	wake   chan struct{} // closed when started
	closed chan struct{}
	once   sync.Once
	parked chan struct{} // signalled when an Accept waits stopped
}

// start opens a QUIC listener on the socket.
func (q *quicShared) start() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.inner != nil {
		return nil
	}
	pc, err := net.FilePacketConn(q.file)
	if err != nil {
		return err
	}
	udp := pc.(*net.UDPConn)
	cfg := q.cfg
	cfg.ListenUDP = func(string, *net.UDPAddr) (*net.UDPConn, error) { return udp, nil }
	in, err := transport.Listen(cfg)
	if err != nil {
		udp.Close()
		return err
	}
	q.inner = in
	close(q.wake)
	return nil
}

func (q *quicShared) Accept() (net.Conn, error) {
	for {
		q.mu.Lock()
		in, wake := q.inner, q.wake
		q.mu.Unlock()
		select {
		case <-q.closed:
			return nil, net.ErrClosed
		default:
		}
		if in == nil {
			select {
			case q.parked <- struct{}{}:
			default:
			}
			select {
			case <-wake:
			case <-q.closed:
			}
			continue
		}
		c, err := in.Accept()
		if err != nil {
			q.mu.Lock()
			stopped := q.inner != in
			q.mu.Unlock()
			if stopped {
				continue // Pause closed it
			}
		}
		return c, err
	}
}

// Pause closes the QUIC listener (its connections end; clients redial)
// and waits for the accept loop to wait for the next start.
func (q *quicShared) Pause(wait time.Duration) error {
	select {
	case <-q.parked:
	default:
	}
	q.mu.Lock()
	in := q.inner
	if in != nil {
		q.inner = nil
		q.wake = make(chan struct{})
	}
	q.mu.Unlock()
	if in != nil {
		in.Close()
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-q.parked:
		return nil
	case <-q.closed:
		return nil
	case <-t.C:
		return fmt.Errorf("quic listener %s: accept loop did not pause within %v", q.addr, wait)
	}
}

// Resume starts a QUIC listener again.
func (q *quicShared) Resume() {
	if err := q.start(); err != nil {
		// The socket is there and was listened on: this is not expected.
		slog.Error("quic listener could not start again", "addr", q.addr, "err", err)
	}
}

func (q *quicShared) Close() error {
	q.once.Do(func() { close(q.closed) })
	q.mu.Lock()
	in := q.inner
	q.inner = nil
	q.mu.Unlock()
	if in != nil {
		in.Close()
	}
	return q.file.Close()
}

func (q *quicShared) Addr() net.Addr { return q.addr }

// linkListen and appListen are what startGateway and startClient open
// their listeners with.
func linkListen(network, addr string) (net.Listener, error) {
	return listenShared("link", network, addr)
}

func appListen(network, addr string) (net.Listener, error) {
	return listenShared("app", network, addr)
}

func adminListen(network, addr string) (net.Listener, error) {
	return listenShared("admin", network, addr)
}

func (u *upgrader) shared(kinds ...string) []*sharedListener {
	u.mu.Lock()
	defer u.mu.Unlock()
	var out []*sharedListener
	for _, l := range u.listeners {
		for _, k := range kinds {
			if l.kind == k {
				out = append(out, l)
			}
		}
	}
	return out
}

// takeOver is the new process's start: it asks the old one for its
// sessions, restores them, and on COMMIT starts them and its listeners.
// A process that is not the new one of an upgrade does nothing. An error
// means the old process keeps its sessions; this one must exit.
func (u *upgrader) takeOver(srv server) error {
	if !u.child() {
		return nil
	}
	defer u.parent.Close()
	hello := proxy.HandoverHello{Protocol: proxy.HandoverProtocol, RecordVersion: proxy.HandoverRecordVersion,
		SnapshotVersion: resume.SnapshotVersion, Version: versionString()}
	restore := func(recs []*proxy.HandoverRecord) (proxy.HandoverTaken, error) {
		if os.Getenv(refuseEnv) == "1" {
			for _, r := range recs {
				if r.File != nil {
					r.File.Close()
				}
			}
			return nil, fmt.Errorf("refused for a test (%s=1)", refuseEnv)
		}
		switch s := srv.(type) {
		case *proxy.Gateway:
			return s.RestoreHandover(recs)
		case *proxy.Client:
			return s.RestoreHandover(recs)
		}
		return nil, fmt.Errorf("%T cannot take sessions", srv)
	}
	taken, n, err := proxy.RequestHandover(u.parent, hello, restore, handoverTimeout)
	if err != nil {
		u.log.Error("upgrade: did not take over; the old process keeps serving", "err", err)
		return fmt.Errorf("upgrade: %w", err)
	}
	taken.Start()
	for _, l := range u.shared("link", "app", "admin") {
		l.Resume()
	}
	u.log.Info("upgrade: took over", "version", versionString(), "pid", os.Getpid(), "sessions", n)
	return nil
}

// ready tells the old process (tableflip) that this one serves: the old
// one then exits.
func (u *upgrader) ready() error {
	if u == nil {
		return nil
	}
	return u.upg.Ready()
}

// upgrade runs one upgrade from the old process's side, on USR2. It
// returns true when the new process has the sessions and serves: this
// one must then exit (without touching the sessions, which it no longer
// has). False: the upgrade failed, was rolled back and logged, and this
// process goes on serving.
func (u *upgrader) upgrade(srv server) bool {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		u.log.Error("upgrade: socket pair", "err", err)
		return false
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "handover"), os.NewFile(uintptr(fds[1]), "handover-new")
	c, err := net.FileConn(mine)
	mine.Close()
	if err != nil {
		theirs.Close()
		u.log.Error("upgrade: socket pair", "err", err)
		return false
	}
	conn := c.(*net.UnixConn)
	defer conn.Close()
	// tableflip keeps a copy of theirs for the new process; ours goes,
	// so that the new process's exit closes the pair.
	err = u.upg.Fds.AddFile(handoverFile, theirs)
	theirs.Close()
	if err != nil {
		u.log.Error("upgrade: hand-over socket", "err", err)
		return false
	}
	exe := os.Args[0]
	u.log.Info("upgrade: starting the new process", "binary", exe)
	upgraded := make(chan error, 1)
	go func() { upgraded <- u.upg.Upgrade() }()

	type outcome struct {
		res proxy.HandoverResult
		err error
	}
	handed := make(chan outcome, 1)
	go func() {
		res, err := proxy.ServeHandover(conn, func() (proxy.HandoverBatch, error) { return u.freeze(srv) }, handoverTimeout)
		handed <- outcome{res, err}
	}()
	var (
		ho    outcome
		upErr error
		upGot bool
	)
	select {
	case ho = <-handed:
	case upErr = <-upgraded:
		upGot = true
		switch {
		case upErr == nil:
			// Ready: the new process wrote DONE before it said so.
			ho = <-handed
		default:
			// The new process ended (or timed out) first: nothing of
			// ours is in its hands unless DONE came, which ServeHandover
			// sees. What it wrote before it went (a REFUSE) is still to
			// be read: a moment for that, then the socket closes under
			// any wait.
			select {
			case ho = <-handed:
			case <-time.After(time.Second):
				conn.Close()
				ho = <-handed
			}
		}
	}
	if ho.err != nil {
		// Rolled back: the listeners accept again (batch.Rollback).
		if !upGot {
			// Its exit status says more than a closed socket does.
			select {
			case upErr = <-upgraded:
				upGot = true
			case <-time.After(time.Second):
			}
		}
		args := []any{"err", ho.err, "new_version", ho.res.Peer.Version, "new_pid", ho.res.Peer.Pid}
		if upErr != nil {
			args = append(args, "new_process", upErr.Error()) // e.g. "child pid=123 exited: exit status 1"
		}
		u.log.Error("upgrade failed; the sessions stay here and this process goes on serving", args...)
		if !upGot {
			upErr = <-upgraded // it exits without COMMIT (or tableflip kills it after upgradeTimeout)
		}
		if upErr == nil {
			// It said it serves without our sessions (no hand-over
			// code?): two processes now accept; this one drains.
			u.log.Error("upgrade: the new process serves without the sessions; this one goes on until they end")
		}
		return false
	}
	u.log.Info("upgrade: sessions handed over", "sessions", ho.res.Sessions, "new_version", ho.res.Peer.Version, "new_pid", ho.res.Peer.Pid)
	if !upGot {
		upErr = <-upgraded
	}
	if upErr != nil {
		// Committed: the sessions are the new process's, whatever
		// became of it. New connections come here again.
		u.log.Error("upgrade: the new process failed after taking the sessions", "err", upErr)
		u.resume()
		return false
	}
	// Sessions that were closing (not handed over: a Close waits for
	// its last bytes to be acknowledged) finish here before the exit.
	ctx, cancel := context.WithTimeout(context.Background(), exitWait)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		u.log.Warn("upgrade: sessions that were closing did not finish before the exit", "wait", exitWait)
	}
	u.log.Info("upgrade: the new process serves; exiting")
	return true
}

// freeze pauses the link and application listeners and freezes the
// sessions; the batch's Rollback resumes the listeners too.
func (u *upgrader) freeze(srv server) (proxy.HandoverBatch, error) {
	for _, l := range u.shared("link", "app") {
		if err := l.Pause(pauseWait); err != nil {
			u.resume()
			return nil, err
		}
	}
	var (
		b   proxy.HandoverBatch
		err error
	)
	switch s := srv.(type) {
	case *proxy.Gateway:
		b, err = s.FreezeForHandover(freezeWait)
	case *proxy.Client:
		b, err = s.FreezeForHandover(freezeWait)
	default:
		err = fmt.Errorf("%T cannot hand sessions over", srv)
	}
	if err != nil {
		u.resume()
		return nil, err
	}
	return &batch{b, u}, nil
}

func (u *upgrader) resume() {
	for _, l := range u.shared("link", "app") {
		l.Resume()
	}
}

type batch struct {
	proxy.HandoverBatch
	u *upgrader
}

func (b *batch) Rollback() {
	b.HandoverBatch.Rollback()
	b.u.resume()
}

// upgradeOnSignal runs an upgrade on USR2; true: this process is to exit.
func upgradeOnSignal(log *slog.Logger, srv server) bool {
	if procUpgrader == nil {
		log.Warn("USR2: upgrades in place are not available in this process")
		return false
	}
	return procUpgrader.upgrade(srv)
}

// upgradeSignals start an upgrade in place.
var upgradeSignals = []os.Signal{syscall.SIGUSR2}

func isUpgradeSignal(sig os.Signal) bool { return sig == syscall.SIGUSR2 }
