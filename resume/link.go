package resume

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// writeBatch bounds the DATA bytes one writer pass puts on the link, so
// ACKs and PONGs are not stuck behind megabytes of data.
const writeBatch = 256 << 10

// finalWriteTimeout bounds the last write of a link being retired (a RESET
// or a final ACK): a blackholed link must not keep a session's goroutines.
const finalWriteTimeout = time.Second

// link is one transport connection attached to a session. Its reader
// goroutine runs until the link is closed; its writer goroutine runs only
// while there is something to send (kick starts it, it exits when it finds
// nothing), so that an idle session does not keep one parked per link. A
// link never comes back: after a failure the session gets a new one.
type link struct {
	s    *session
	conn net.Conn
	fr   *frame.Reader
	prev *link // the link before: its reader must exit before ours reads

	// rxStart is the offset the first DATA on this link carries (what we
	// stated in the handshake); rxOff advances with every DATA byte. Only
	// the reader touches rxOff.
	rxStart uint64
	rxOff   uint64

	closed     chan struct{}
	closeOnce  sync.Once
	readerDone chan struct{}
	// writerDone is closed once no writer runs and none will again (the
	// link is closed or no longer attached): the next link's writer
	// waits for it before it reads the replay buffer.
	writerDone chan struct{}
	started    bool // under s.mu

	// Writer state, under wmu (taken after s.mu, never before it). A
	// writer runs from kick to the first time it finds nothing to send.
	wmu sync.Mutex
	// idle, if not nil, is closed when the running writer returns (a
	// bulk ReadFrom waits for it: txSpliceRoom).
	idle     chan struct{}
	wStarted bool  // start ran: kick may start writers
	writing  bool  // a writer goroutine runs
	wDone    bool  // writerDone is closed
	wPrev    *link // its writer must be done before ours writes

	doneOnce sync.Once
	lastRecv atomic.Int64 // UnixNano of the last frame received
	// dataAt is the UnixNano of the last DATA frame received: DATA that
	// came after our last DATA sent is the answer the attention window
	// waits for (busy).
	dataAt atomic.Int64
	liveMu sync.Mutex
	live   *time.Timer // nil once stopped
	liveAt time.Time   // when live fires; zero while idle and unarmed

	// Under s.mu.
	grace  *time.Timer // a retired link's grace period
	pingAt int64       // UnixNano of the last PING sent
	sentAt int64       // UnixNano of the last DATA sent
	// resumedAt is when a resumed link was attached, until its first DATA
	// byte moves (zero after, and on first links).
	resumedAt time.Time
	// busyAt is when the link last turned busy (UnixNano): silence on a
	// busy link counts from then or from the last frame, whichever is
	// later, as TCP's user timeout counts from the oldest unacknowledged
	// transmission.
	busyAt  int64
	pingDue bool
	pongDue bool
	pongVal uint64
	goAway  *frame.GoAway     // GOAWAY to send
	final   bool              // write what is queued, then close
	reset   *frame.CodeReason // RESET to send as the final frame
	// awaitClose: the RESET sent as final frame, kept until the peer
	// closes the link in answer.
	awaitClose *frame.CodeReason

	// Writer-owned: the batch being put together or written.
	scratch  []byte
	segs     [][]byte
	vectored bool
	// sock is what flush writes: conn, or the TCP socket under a
	// LinkSocket.
	sock net.Conn
	// rc is the socket under a vectored link, for the non-blocking
	// writes of sendInline (nil: it is not used).
	rc syscall.RawConn
	// spliceRC is the socket under a tcp link, for the reader's splice of
	// DATA payloads to a TCP sink (spliceData); nil: copy only.
	spliceRC syscall.RawConn
	// pinned: the batch holds replay-buffer bytes from pinAt on, so the
	// session keeps them until the write returns (set and cleared under
	// s.mu).
	pinned bool
	pinAt  uint64

	// Reader-owned.
	confirmedSeen bool // this link's reader has received a frame
	// unconfirmed (client): DATA came that no answered PING has
	// confirmed yet, and the timer was pulled in for it. It keeps the
	// read loop from taking the lock for every DATA frame of a bulk.
	unconfirmed bool
	discard     []byte // bytes skipped as duplicates

	// rp is where an idle reader waits (idleWait).
	rp readPark

	// kernelKeepalive: the kernel probes this idle link (SO_KEEPALIVE,
	// set by newLink), so the link sends no keepalive PING.
	kernelKeepalive bool
}

// readPark is the state of a reader that may wait in the shared poller.
type readPark struct {
	mu sync.Mutex
	// off: the link's read deadline belongs to someone else (retire,
	// finish) or the link is closed; the reader waits the ordinary way,
	// under that deadline, from now on.
	off bool
	// id is the reader's registration in the shared poller while it is
	// parked there (no goroutine runs it); 0 otherwise.
	id uint64
	// sawData: the last frame read was DATA (reader-owned, not under mu).
	sawData bool
	// staged: the reader's read in progress is bounded by the idle
	// deadline stage set.
	staged bool
}

func newLink(s *session, conn net.Conn, fr *frame.Reader, rxStart uint64) *link {
	l := &link{
		s: s, conn: conn, fr: fr, rxStart: rxStart, rxOff: rxStart,
		closed:     make(chan struct{}),
		readerDone: make(chan struct{}),
		writerDone: make(chan struct{}),
	}
	// sock is what the writer writes and the poller waits on: the socket
	// itself under a layer that has given up all it read ahead.
	sock := conn
	if ls, ok := conn.(LinkSocket); ok {
		if tc := ls.Socket(); tc != nil {
			sock = tc
		}
	}
	l.sock = sock
	switch sock.(type) {
	case *net.TCPConn, *net.UnixConn:
		l.vectored = true
	}
	// An idle link waits for its next frame in the poller, without a
	// read-ahead buffer: a TCP link, and a TLS link over a TLSSocket
	// (tlsIdle; its records are decrypted in crypto/tls's own buffers).
	l.tlsIdle(conn)
	if sc, ok := sock.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			if l.vectored && sharedPollerOK {
				fr.SetIdleWait(func() error { return l.idleStage(rc) })
				fr.SetIdleSettle(func(err error, empty bool) error { return l.idleSettle(rc, err, empty) })
			} else {
				fr.SetIdleWait(func() error { return waitReadable(rc) })
			}
			if l.vectored && inlineWrites {
				l.rc = rc
			}
			if spliceRx {
				l.spliceRC = spliceConn(sock)
			}
		}
	}
	l.kernelKeepalive = kernelKeepalive(conn, s.cfg, l.keepaliveIdle())
	l.lastRecv.Store(time.Now().UnixNano())
	return l
}

// minKernelProbes is the fewest unanswered kernel keepalive probes that
// end a link. A probe is not retransmitted, as the segment of a PING is
// within LivenessTimeout, and probes are lost in bursts: the kernel fires
// the keepalive timers of sockets that went quiet together in one batch
// (its timer wheel rounds a 60 s timer to seconds), and a batch larger
// than a queue on the way (a loopback's or veth's backlog,
// net.core.netdev_max_backlog, 1,000) loses the excess. 9,000 idle
// sessions on loopback lost 75 and 144 links in two runs with 4 probes a
// second apart, none with 10.
const minKernelProbes = 10

// kernelKeepalive hands an idle link's probing to the kernel when the link
// is a TCP socket to its peer (plain, or under TLS): the first probe after
// idle of silence, then one every PingInterval (whole seconds, the
// kernel's unit), the link dead once LivenessTimeout's worth of them, and
// at least minKernelProbes, went unanswered, which the parked reader
// learns from the poller (EPOLLERR, ETIMEDOUT). It reports whether the
// kernel probes; if not, the link's keepalive is a PING frame.
//
// The kernel does not watch the attention window (busy): probes a second
// apart from every link that sent DATA in the same moment fire in one
// batch each second, and the same links lose theirs each time. 9,000
// sessions that exchanged a byte in the same second lost 852 links on
// loopback with 2 probes, 433 with 10; PINGs, whose segments TCP
// retransmits, lose none.
func kernelKeepalive(conn net.Conn, cfg *Config, idle time.Duration) bool {
	if cfg.KeepalivePing || idle < time.Second {
		return false
	}
	tc := peerSocket(conn)
	if tc == nil {
		return false
	}
	every := max(cfg.PingInterval.Round(time.Second), time.Second)
	count := int((cfg.LivenessTimeout + every - 1) / every)
	return tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: idle, Interval: every, Count: max(count, minKernelProbes)}) == nil
}

// kick makes sure a writer runs to send what is due: it starts one unless
// one is running (which collects again before it exits, under s.mu, so
// nothing queued before that is missed).
func (l *link) kick() {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.writing || l.wDone || !l.wStarted {
		return
	}
	l.writing = true
	l.s.spawn(l.writeLoop)
}

// writerExit records that the running writer returns; terminal: no writer
// may run again. Caller holds wmu.
func (l *link) writerExitLocked(terminal bool) {
	l.writing = false
	if l.idle != nil {
		close(l.idle)
		l.idle = nil
	}
	if (terminal || isClosed(l.closed)) && !l.wDone {
		l.wDone = true
		close(l.writerDone)
	}
}

func (l *link) writerExit(terminal bool) {
	l.wmu.Lock()
	l.writerExitLocked(terminal)
	l.wmu.Unlock()
}

// close shuts the connection; both goroutines see it and exit.
func (l *link) close() {
	l.closeOnce.Do(func() {
		close(l.closed)
		// Out of the shared poller before the socket is closed: its fd
		// number may be reused at once.
		l.ownDeadline(nil)
		closeRaw(l.conn)
		l.liveMu.Lock()
		if l.live != nil {
			l.live.Stop()
			l.live = nil
		}
		l.liveMu.Unlock()
		if !l.started {
			l.markDone(l.prev)
		}
		l.wmu.Lock()
		if l.wStarted && !l.writing {
			l.writerExitLocked(true)
		}
		l.wmu.Unlock()
	})
}

// finish asks the writer to flush what is queued (and reset, if set) and
// close the link. Caller holds s.mu. The session has already let go of l.
//
// A client's RESET may vanish into a link that died silently, and then the
// gateway would keep the session parked until it expires. So the client
// waits (up to LivenessTimeout) for the gateway to close the link, which it
// does on reading the RESET; if that does not happen, it delivers the RESET
// again over a new link.
func (l *link) finish(reset *frame.CodeReason) {
	s := l.s
	l.final = true
	l.reset = reset
	if reset != nil && s.cl != nil && s.reconnectTimeout > 0 {
		l.awaitClose = reset
		l.ownDeadline(func() { l.conn.SetReadDeadline(time.Now().Add(s.cfg.LivenessTimeout)) })
	}
	l.conn.SetWriteDeadline(time.Now().Add(finalWriteTimeout))
	l.kick()
}

// peerClosed reports whether a read error means the peer closed the link.
func peerClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)
}

// awaitingClose returns the RESET this retired link waits to see
// acknowledged by the peer closing it, or nil.
func (l *link) awaitingClose() *frame.CodeReason {
	l.s.mu.Lock()
	defer l.s.unlock()
	return l.awaitClose
}

// retire stops using a link that a newer resume replaced, without closing
// it yet: in a GOAWAY migration it still works, and the client closes it
// itself once it has RESUMED (closing first would look like a failure to
// it). Expired deadlines get the reader and writer out of any blocked call
// at once, so the new link's goroutines need not wait; the link is closed
// for good after a grace period. Caller holds s.mu and has detached l.
func (l *link) retire() {
	if !l.started {
		// Replaced before it ran (two resumes racing): nobody uses it.
		l.close()
		return
	}
	l.ownDeadline(func() { l.conn.SetDeadline(time.Unix(1, 0)) })
	l.kick()
	// The grace timer counts as one of the session's goroutines; the
	// session's end closes the link at once and stops it.
	s := l.s
	s.track(1)
	l.grace = time.AfterFunc(finalWriteTimeout, func() {
		l.close()
		s.mu.Lock()
		s.dropRetired(l)
		s.unlock()
		s.track(-1)
	})
	s.retired = append(s.retired, l)
}

// markDone releases a later link waiting on this one that never ran its
// goroutines, once the link before it is done: the chain of waits must not
// skip a link whose writer may still be reading the replay buffer.
func (l *link) markDone(prev *link) {
	l.doneOnce.Do(func() {
		if prev == nil {
			close(l.readerDone)
			close(l.writerDone)
			return
		}
		l.s.spawn(func() {
			<-prev.readerDone
			<-prev.writerDone
			close(l.readerDone)
			close(l.writerDone)
		})
	})
}

// start runs the link's goroutines. Caller holds s.mu and has attached l.
func (l *link) start() {
	s := l.s
	if isClosed(l.closed) {
		l.markDone(l.prev)
		return
	}
	l.started = true
	prev := l.prev
	l.prev = nil
	s.spawn(func() { l.readLoop(prev) })
	l.startWriter(prev)
	l.liveMu.Lock()
	if !isClosed(l.closed) {
		l.live = time.AfterFunc(s.cfg.PingInterval, l.checkLiveness)
		l.liveAt = time.Now().Add(s.cfg.PingInterval)
	}
	l.liveMu.Unlock()
	l.kick()
}

// startWriter lets kick start writers, the first of which waits for prev's
// to be done. Caller holds s.mu.
func (l *link) startWriter(prev *link) {
	l.wmu.Lock()
	l.wStarted, l.wPrev = true, prev
	l.wmu.Unlock()
}

// Liveness is acknowledgement-driven, as TCP's user timeout is, so that an
// idle session costs (almost) nothing:
//
//   - A busy link (DATA sent and not yet acknowledged, a PING not yet
//     answered, or DATA sent within the last AttentionWindow: an
//     application that sent a request waits for the answer, and must learn
//     fast that the path died under it) must hear from the peer within
//     LivenessTimeout. After PingInterval of silence it sends a PING, so
//     that a peer with nothing to say still answers. On the client the
//     answer (DATA received after its last DATA sent) and one PING after
//     its last bytes end the attention: an answered request costs one
//     PING and its PONG (attentionFrom).
//   - The gateway's window holds only where it pings anyway (not on a
//     kernel-probed TCP link, attentionFrom): on tcp and tls a session
//     whose requests are answered costs the gateway no PING after them.
//   - An idle link only keeps its path alive: after KeepaliveInterval of
//     silence the client sends a PING (it keeps NAT bindings, and the
//     PING makes the link busy, so a path that died is found a
//     LivenessTimeout later). The gateway waits twice as long before it
//     pings, so that its client's keepalive normally comes first and an
//     idle session costs one PING and one PONG per KeepaliveInterval.
//     On a TCP link the kernel sends these probes instead, on the same
//     schedule (kernelKeepalive): an idle session then costs no wake-up
//     of either process at all.
//
// A link's timer fires only when one of these is due; a link that turns
// busy pulls it in (armBusy).

// busy reports whether the link waits for the peer. Caller holds s.mu.
func (l *link) busy() bool {
	if l.s.send.next > l.s.send.acked || l.pingAt > l.lastRecv.Load() {
		return true
	}
	from := l.attentionFrom()
	return from != 0 && time.Since(time.Unix(0, from)) < AttentionWindow
}

// attentionFrom is when the link's attention window (busy) began, or 0
// while none holds. On the client it holds while it waits for an answer
// (from its last DATA sent until DATA comes back), and then until a PING
// sent after the last DATA received is answered: an answer may be cut by
// a silent path after its first bytes, and the gateway that holds the
// rest cannot tell the client (only the client dials). The links are
// in order, so the PONG says every byte sent before it arrived; one PING
// per answer, PingInterval after its last bytes. On the gateway it holds
// through the window after its last DATA sent, but not on a kernel-probed
// link: a gateway that learned fast of a dead path would help neither
// application (only the client can dial a new link, and it watches as
// above), and its PINGs after every answer were most of what a session
// that exchanged data in the last 30 s cost. Where it still pings (quic,
// behind a PROXY balancer, KeepalivePing) the client's own probing may
// stop at any moment, so it keeps watching. Caller holds s.mu.
func (l *link) attentionFrom() int64 {
	switch {
	case l.sentAt == 0:
		return 0
	case l.s.cl != nil:
		data := l.dataAt.Load()
		switch {
		case l.sentAt > data: // waiting for the answer
			return l.sentAt
		case l.pingAt < data: // its last bytes not yet confirmed
			return data
		}
		return 0
	case l.kernelKeepalive:
		return 0
	}
	return l.sentAt
}

// keepalive is how long an idle link may stay silent before this side
// sends a PING (0: never; the kernel probes it, or nobody does).
func (l *link) keepalive() time.Duration {
	if l.kernelKeepalive {
		return 0
	}
	return l.keepaliveIdle()
}

// keepaliveIdle is how long an idle link may stay silent before this side
// probes it, by PING or the kernel's probe (0: never).
func (l *link) keepaliveIdle() time.Duration {
	if l.s.cl == nil {
		return 2 * l.s.cfg.KeepaliveInterval
	}
	return l.s.cfg.KeepaliveInterval
}

// checkLiveness runs on the link's timer.
func (l *link) checkLiveness() {
	s := l.s
	cfg := s.cfg
	s.mu.Lock()
	if s.link != l {
		s.unlock()
		return
	}
	busy := l.busy()
	idle := time.Since(time.Unix(0, l.lastRecv.Load()))
	if busy {
		idle = time.Since(time.Unix(0, max(l.lastRecv.Load(), l.busyAt)))
	}
	var next time.Duration // 0: not rearmed (idle, no keepalive)
	switch {
	case busy && idle >= cfg.LivenessTimeout:
		s.unlock()
		s.linkFailed(l, errLivenessTimer)
		return
	case busy && idle >= cfg.PingInterval:
		l.pingDue = true
		l.kick()
		next = min(cfg.PingInterval, cfg.LivenessTimeout-idle)
	case busy:
		next = cfg.PingInterval - idle
	case l.keepalive() > 0 && idle >= l.keepalive():
		l.pingDue = true // the PING makes the link busy
		l.kick()
		next = cfg.PingInterval
	case l.keepalive() > 0:
		next = l.keepalive() - idle
	}
	s.unlock()
	l.liveMu.Lock()
	defer l.liveMu.Unlock()
	if l.live == nil {
		return
	}
	if next > 0 {
		l.live.Reset(next)
		l.liveAt = time.Now().Add(next)
	} else {
		l.liveAt = time.Time{}
	}
}

// armBusy makes the timer fire within PingInterval: the link has just
// turned busy. Caller holds s.mu.
func (l *link) armBusy() {
	l.liveMu.Lock()
	defer l.liveMu.Unlock()
	if l.live == nil {
		return
	}
	due := time.Now().Add(l.s.cfg.PingInterval)
	if l.liveAt.IsZero() || l.liveAt.After(due) {
		l.live.Reset(l.s.cfg.PingInterval)
		l.liveAt = due
	}
}

func (l *link) readLoop(prev *link) {
	if prev != nil {
		// Our DATA goes into the receive buffer's tail without the lock;
		// the previous link's reader may still be doing the same.
		<-prev.readerDone
	}
	l.readOn()
}

// readOn runs the reader until the link is done, or until it parks in the
// shared poller: then the poller's dispatcher (or whatever wakes it, see
// ownDeadline) runs readOn again in a new goroutine.
func (l *link) readOn() {
	if l.readFrames() {
		return
	}
	// The session keeps its last link (for addresses) while parked: let
	// the read-ahead buffer go with the reader.
	l.fr.Release()
	l.fr, l.discard = nil, nil
	close(l.readerDone)
}

// readFrames reads and handles frames until the link fails (false) or the
// reader parks in the shared poller (true).
func (l *link) readFrames() (parked bool) {
	s := l.s
	for {
		h, err := l.fr.Next()
		if err == errParked {
			return true
		}
		if err != nil {
			if reset := l.awaitingClose(); reset != nil {
				l.close()
				if !peerClosed(err) {
					s.lg().Debug("RESET not confirmed, sending it on a new link", "err", err)
					s.spawn(func() { s.sendResetOnNewLink(*reset) })
				}
				return false
			}
			s.linkFailed(l, err)
			return false
		}
		now := time.Now().UnixNano()
		l.lastRecv.Store(now)
		if h.Type == frame.TypeData {
			l.dataAt.Store(now)
			if s.cl != nil && !l.unconfirmed {
				// DATA after the window closed (a push, or the next
				// piece of a slow answer) opens it again (busy): the
				// timer must say so, or the PING that confirms these
				// bytes waits for the keepalive, which on a kernel-probed
				// link never comes.
				l.unconfirmed = true
				s.mu.Lock()
				if l.busy() {
					l.armBusy()
				}
				s.unlock()
			}
		}
		if !l.confirmedSeen {
			l.confirmedSeen = true
			s.mu.Lock()
			s.confirm()
			s.unlock()
		}
		l.rp.sawData = h.Type == frame.TypeData
		if h.Type == frame.TypeData {
			err = l.readData(h.Len)
		} else {
			err = l.readControl(h)
		}
		if err == errStale && l.awaitingClose() != nil {
			// Retired link: skip what the peer sends until it closes.
			for err == errStale && l.fr.DataRemaining() > 0 {
				if l.discard == nil {
					l.discard = make([]byte, 4096)
				}
				if _, rerr := l.fr.ReadData(l.discard); rerr != nil {
					err = rerr
				}
			}
			if err == errStale {
				continue
			}
		}
		if err != nil {
			s.linkFailed(l, err)
			return false
		}
	}
}

var errStale = errors.New("link no longer attached")

// readData moves one DATA payload to the application: spliced from the
// link socket to the sink's when it can be (spliceData), else into the
// receive buffer.
func (l *link) readData(n int) error {
	s := l.s
	for n > 0 {
		var k int
		var err error
		handled := false
		if l.spliceRC != nil && s.spliceSink.Load() {
			if b := l.fr.BufferedLen(); b > 0 {
				// What the read-ahead holds goes first, by copy; the
				// rest may be spliced.
				k, err = l.copyStep(min(n, b), l.fr.ReadData)
				handled = true
			} else {
				k, handled, err = l.spliceData(n)
			}
		}
		if !handled {
			k, err = l.copyStep(n, l.fr.ReadData)
		}
		n -= k
		if err != nil {
			return err
		}
	}
	return nil
}

// copyStep moves up to n bytes of a DATA payload from read into the
// receive buffer (its lent tail, filled without the lock) and returns how
// many it read.
func (l *link) copyStep(n int, read func([]byte) (int, error)) (int, error) {
	s := l.s
	s.mu.Lock()
	if s.link != l {
		s.unlock()
		return 0, errStale
	}
	if l.rxOff+uint64(n) > s.recv.window {
		s.unlock()
		return 0, newError(frame.CodeValidation, s.id, "DATA to offset %d beyond window %d", l.rxOff+uint64(n), s.recv.window)
	}
	var dst []byte
	dup := s.recv.End() > l.rxOff
	if s.recv.fin && !dup {
		// Duplicates of bytes before the CLOSE_WRITE are fine: a
		// migration replays what the old link already delivered.
		s.unlock()
		return 0, newError(frame.CodeValidation, s.id, "DATA after CLOSE_WRITE")
	}
	switch {
	case dup: // already held (overlapping migration): skip
		if l.discard == nil {
			l.discard = make([]byte, 4096)
		}
		dst = l.discard[:min(len(l.discard), int(s.recv.End()-l.rxOff))]
	case s.recv.End() < l.rxOff:
		s.unlock()
		return 0, newError(frame.CodeInternal, s.id, "gap: DATA at %d, have %d", l.rxOff, s.recv.End())
	default:
		dst = s.recv.Tail()
	}
	s.unlock()
	if len(dst) > n {
		dst = dst[:n]
	}
	k, err := read(dst)
	inline := false
	s.mu.Lock()
	if s.link != l {
		s.unlock()
		return k, errStale
	}
	l.rxOff += uint64(k)
	if k > 0 {
		l.firstByte()
	}
	if !dup {
		if s.recv.shut {
			s.recv.Commit(k)
			s.recv.Discard(s.recv.End())
			s.advertise()
		} else {
			s.recv.Commit(k)
			inline = s.claimSink()
			s.wakeReaders()
		}
		if s.recv.End()-s.recv.ackedTo >= s.ackThreshold() {
			s.kick()
		} else {
			s.armAck()
		}
	}
	s.unlock()
	if inline {
		s.pumpInline()
	}
	return k, err
}

func (l *link) readControl(h frame.Header) error {
	s := l.s
	p, err := l.fr.Payload(h)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.unlock()
	if s.link != l {
		return errStale
	}
	switch h.Type {
	case frame.TypeAck:
		a, err := frame.ParseAck(p)
		if err != nil {
			return err
		}
		return s.onAck(a)
	case frame.TypePing:
		v, _ := frame.ParseU64(p)
		l.pongDue, l.pongVal = true, v
		l.kick()
	case frame.TypePong:
		v, _ := frame.ParseU64(p)
		if rtt := time.Since(time.Unix(0, int64(v))); rtt >= 0 && rtt < time.Hour {
			s.stats.RTT = rtt
		}
		if int64(v) >= l.dataAt.Load() {
			l.unconfirmed = false // every DATA before it arrived
		}
	case frame.TypeCloseWrite:
		off, _ := frame.ParseU64(p)
		if off != l.rxOff && !(s.recv.fin && off == s.recv.finOff) {
			return newError(frame.CodeValidation, s.id, "CLOSE_WRITE at %d, stream is at %d", off, l.rxOff)
		}
		if off < s.recv.End() {
			return newError(frame.CodeValidation, s.id, "CLOSE_WRITE at %d below received %d", off, s.recv.End())
		}
		s.recv.fin, s.recv.finOff = true, off
		s.wakeReaders()
		l.kick() // ACK with AckFin at once
	case frame.TypeReset:
		cr, err := frame.ParseCodeReason(p)
		if err != nil {
			return err
		}
		if cr.Code == frame.CodeNone && s.recv.fin {
			s.end(nil, nil, "peer closed")
			return errStale
		}
		return &Error{Code: cr.Code, Reason: cr.Reason, Remote: true, Session: s.id}
	case frame.TypeGoAway:
		g, err := frame.ParseGoAway(p)
		if err != nil {
			return err
		}
		if s.cl == nil {
			return newError(frame.CodeValidation, s.id, "GOAWAY from a client")
		}
		if g.Addr != "" {
			if s.cfg.DialAddr == nil {
				s.after(func() {
					s.lg().Warn("gateway asked to move the session to another address; this client cannot dial one, it moves to a new link at the same address",
						"to", g.Addr, "reason", g.Reason)
				})
			} else {
				s.cl.redirect(s.cfg.DialAddr, g.Addr)
			}
		}
		s.after(func() {
			s.lg().Info("gateway asked to move the session", "code", g.Code, "to", g.Addr, "reason", g.Reason)
		})
		s.startMigration()
	default:
		return newError(frame.CodeValidation, s.id, "%v frame after the handshake", h.Type)
	}
	return nil
}

// writeLoop sends what is due until there is nothing left, then returns;
// kick starts it again. Only one runs per link at a time (l.writing).
func (l *link) writeLoop() { l.writeLoopFrom(false, false) }

// writeLoopFrom is writeLoop that, if pending, first finishes the batch
// left in l.segs (final as collected with it) by sendInline.
func (l *link) writeLoopFrom(pending, final bool) {
	s := l.s
	l.wmu.Lock()
	p := l.wPrev
	l.wmu.Unlock()
	if p != nil {
		<-p.writerDone
		l.wmu.Lock()
		l.wPrev = nil // and claimWriter may take turns now
		l.wmu.Unlock()
	}
	for {
		if !pending {
			s.mu.Lock()
			n := l.collect()
			final = l.final
			stale := s.link != l && !final
			if stale || (n == 0 && !final) {
				// Under s.mu: a kick after our collect sees writing
				// false and starts the next writer. A stale (retired)
				// link never writes again: the link that replaced it
				// waits for us.
				l.writerExit(stale)
				s.unlock()
				return
			}
			s.unlock()
		}
		pending = false
		if len(l.segs) > 0 {
			_, err := l.flush()
			l.unpin()
			if err != nil {
				if !final {
					s.linkFailed(l, err)
				}
				l.close()
				l.writerExit(true)
				return
			}
		}
		if final {
			if l.awaitingClose() == nil {
				l.close()
			} // else the reader closes it when the peer does
			l.writerExit(true)
			return
		}
	}
}

// unpin lets the session free the replay-buffer bytes of the batch just
// written.
func (l *link) unpin() {
	if l.pinned {
		s := l.s
		s.mu.Lock()
		s.send.unpin(l.pinAt)
		l.pinned = false
		s.releaseSent()
		s.unlock()
	}
}

// inlineSendMax bounds what sendInline sends: a request or an answer, not
// bulk, which a writer goroutine sends in larger batches (measured: bulk
// sent inline cost 15-40 % more CPU per GB on the sending proxy).
const inlineSendMax = 16 << 10

// claimWriter makes the caller the current link's writer, if none runs
// and the link can be written without blocking: it must call sendInline
// (or writerExit(false)) after releasing mu. Caller holds mu.
func (s *session) claimWriter() *link {
	l := s.link
	if l == nil || l.rc == nil || s.send.End()-s.send.next > inlineSendMax {
		return nil
	}
	l.wmu.Lock()
	defer l.wmu.Unlock()
	if l.writing || l.wDone || !l.wStarted || l.wPrev != nil {
		return nil
	}
	l.writing = true
	return l
}

// sendInline is a writer's turn run by the goroutine that just put bytes
// into the replay buffer (claimWriter): it writes what is due with
// non-blocking writes and leaves whatever would block, the final frames
// and any error to a writer goroutine, which finishes the batch. One
// goroutine hand-off less per message than waking a writer.
func (l *link) sendInline() {
	s := l.s
	for {
		s.mu.Lock()
		n := l.collect()
		final := l.final
		stale := s.link != l && !final
		if stale || (n == 0 && !final) {
			l.writerExit(stale)
			s.unlock()
			return
		}
		s.unlock()
		if final || writevNonBlocking(l.rc, &l.segs) != nil {
			s.spawn(func() { l.writeLoopFrom(true, final) })
			return
		}
		l.unpin()
	}
}

// collect gathers what is due into l.segs and returns the byte count.
// Caller holds s.mu.
func (l *link) collect() int {
	s := l.s
	l.scratch = l.scratch[:0]
	l.segs = l.segs[:0]
	if s.link != l && !l.final {
		return 0
	}
	type piece struct {
		from, to int    // in scratch
		data     []byte // or payload
	}
	var pieces [32]piece
	np := 0
	mark := 0
	cut := func() {
		if len(l.scratch) > mark {
			pieces[np] = piece{from: mark, to: len(l.scratch)}
			np++
			mark = len(l.scratch)
		}
	}
	if l.pongDue {
		l.scratch = frame.AppendU64(l.scratch, frame.TypePong, l.pongVal)
		l.pongDue = false
	}
	if l.pingDue {
		now := time.Now().UnixNano()
		if !l.busy() {
			l.busyAt = now
		}
		l.scratch = frame.AppendU64(l.scratch, frame.TypePing, uint64(now))
		l.pingDue = false
		l.pingAt = now
	}
	if !s.aborted && s.ackNeeded() {
		fl := uint8(0)
		if s.recv.fin {
			fl = frame.AckFin
		}
		l.scratch = frame.AppendAck(l.scratch, frame.Ack{Received: s.recv.End(), Window: s.recv.window, Flags: fl})
		s.recv.ackedTo, s.recv.ackedWin, s.recv.ackedFin, s.recv.ackDue = s.recv.End(), s.recv.window, s.recv.fin, false
		if s.recv.ackedFin {
			defer s.maybeFinish()
		}
	}
	if l.goAway != nil {
		l.scratch, _ = frame.AppendGoAway(l.scratch, *l.goAway) // GoAwayTo checked the address
		l.goAway = nil
	}
	if l.final {
		if l.reset != nil {
			l.scratch = frame.AppendCodeReason(l.scratch, frame.TypeReset, l.reset.Code, l.reset.Reason)
			l.reset = nil
		}
	} else {
		limit := min(s.send.End(), s.send.window)
		budget := writeBatch
		from := s.send.next
		wasIdle := !l.busy()
		for s.send.next < limit && budget > 0 && np < len(pieces)-6 {
			n := int(min(limit-s.send.next, uint64(frame.MaxPayload), uint64(budget)))
			l.scratch = frame.AppendDataHeader(l.scratch, n)
			cut()
			start := len(l.segs)
			l.segs = s.send.Slices(l.segs, s.send.next, n)
			for _, seg := range l.segs[start:] {
				pieces[np] = piece{data: seg}
				np++
			}
			l.segs = l.segs[:start]
			s.send.next += uint64(n)
			budget -= n
		}
		if s.send.next > from {
			l.sentAt = time.Now().UnixNano()
			l.firstByte()
			// The writev reads these bytes after we unlock: keep them.
			s.send.pin(from)
			l.pinned, l.pinAt = true, from
			s.send.highest = max(s.send.highest, s.send.next)
			if wasIdle {
				l.busyAt = time.Now().UnixNano()
				l.armBusy()
			}
		}
		if s.send.shut && !s.send.finSent && s.send.next == s.send.End() {
			l.scratch = frame.AppendU64(l.scratch, frame.TypeCloseWrite, s.send.End())
			s.send.finSent = true
		}
	}
	cut()
	total := 0
	for _, p := range pieces[:np] {
		b := p.data
		if b == nil {
			b = l.scratch[p.from:p.to]
		}
		l.segs = append(l.segs, b)
		total += len(b)
	}
	return total
}

// flush writes l.segs: one writev on TCP, one buffered write otherwise.
func (l *link) flush() (int, error) {
	if l.vectored {
		bufs := net.Buffers(l.segs)
		n, err := bufs.WriteTo(l.sock)
		return int(n), err
	}
	// Coalesce into one pooled buffer per write (a TLS record or a QUIC
	// frame per 4-byte header would be wasteful); nothing is held between
	// flushes, so an idle link costs no write buffer.
	bp := writeBufPool.Get().(*[writeBufSize]byte)
	defer writeBufPool.Put(bp)
	total, fill := 0, 0
	put := func() error {
		n, err := l.conn.Write(bp[:fill])
		total += n
		fill = 0
		return err
	}
	for _, b := range l.segs {
		for len(b) > 0 {
			k := copy(bp[fill:], b)
			fill += k
			b = b[k:]
			if fill == len(bp) {
				if err := put(); err != nil {
					return total, err
				}
			}
		}
	}
	if fill > 0 {
		if err := put(); err != nil {
			return total, err
		}
	}
	return total, nil
}

const writeBufSize = 64 << 10

var writeBufPool = sync.Pool{New: func() any { return new([writeBufSize]byte) }}

// linkReadBuffer is the read-ahead of a link's frame reader, held by every
// link for its life: small, so that an idle session costs little, and
// smaller than a chunk, so that bufio reads DATA payloads straight into
// the receive buffer. (64 KiB measured no faster on loopback.)
const linkReadBuffer = 8 << 10

// A LinkSocket is a link's connection that reads its TCP socket through a
// layer of its own which may read ahead, such as a reader of a PROXY
// protocol header. Once that layer holds nothing more, Socket returns the
// socket and the link reads and writes it directly, as a plain TCP link:
// its reader parks in the shared poller while idle, writes are vectored
// and non-blocking, DATA is spliced. Deadlines and Close still go through
// the layer. Errors of the direct reads and writes name the socket's own
// peer. While Socket returns nil (before the layer's first Read, or while
// it holds bytes), the link goes through Read and Write, in a goroutine.
// Pass a LinkSocket to TLSSocket for the same under TLS.
type LinkSocket interface {
	net.Conn
	// Socket is the TCP socket once every byte the layer read from it
	// has been returned by Read, else nil. Called from the goroutine
	// that reads the connection.
	Socket() *net.TCPConn
}

// A Middlebox is a link's connection whose TCP connection ends at a
// middlebox rather than at the peer: on a gateway, a link that came
// through a load balancer, as its PROXY header showed. The kernel's
// keepalive probes would go no further than the middlebox, whose own idle
// timeout counts only bytes that cross it; so such a link is probed with
// PING frames, which do.
type Middlebox interface {
	ViaMiddlebox() bool
}

// peerSocket is the TCP socket a link's connection runs over, when that
// socket's other end is the peer; nil for anything else (QUIC, a pipe, a
// Middlebox).
func peerSocket(c net.Conn) *net.TCPConn {
	for range 4 { // tls over tlsSocket over a PROXY conn over the socket
		if m, ok := c.(Middlebox); ok && m.ViaMiddlebox() {
			return nil
		}
		switch x := c.(type) {
		case *net.TCPConn:
			return x
		case *tlsSocket:
			c = x.Conn
		case netConner: // *tls.Conn, a PROXY conn
			c = x.NetConn()
		default:
			return nil
		}
	}
	return nil
}

// netConner is a layer over a connection that gives it up: *tls.Conn, a
// PROXY-protocol conn.
type netConner interface{ NetConn() net.Conn }

// closeRaw closes a link without ceremony. A *tls.Conn's Close would first
// write a close_notify alert, which on a blackholed link blocks for up to
// 5 s (and this runs under the session's lock); the session protocol has
// its own end frames, so the TCP socket underneath is closed directly.
func closeRaw(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		if nc := tc.NetConn(); nc != nil {
			nc.Close()
			return
		}
	}
	c.Close()
}

// firstByte reports the first DATA byte moved on a resumed link (Hooks).
// Caller holds s.mu.
func (l *link) firstByte() {
	if l.resumedAt.IsZero() {
		return
	}
	d := time.Since(l.resumedAt)
	l.resumedAt = time.Time{}
	if h := l.s.cfg.Hooks; h != nil && h.FirstByte != nil {
		l.s.after(func() { h.FirstByte(d) })
	}
}
