package resume

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
)

// Conn is one end of a resumable session. It is a net.Conn whose byte
// stream survives the loss of any number of links: writes are kept until
// the peer acknowledges them and replayed on the next link. When the stream
// cannot continue without a gap, every call fails with an *Error.
type Conn struct{ s *session }

// Read reads received bytes. After the peer's CloseWrite and all bytes
// before it, Read returns io.EOF. After an abort it returns the *Error at
// once, dropping what was buffered (as TCP does on RST).
func (c *Conn) Read(p []byte) (int, error) {
	s := c.s
	s.rmu.Lock()
	defer s.rmu.Unlock()
	s.mu.Lock()
	for {
		switch {
		case s.frozen:
			// What is buffered goes to the next process with the session.
			s.unlock()
			return 0, ErrFrozen
		case s.localClosed:
			s.unlock()
			return 0, ErrConnClosed
		case s.aborted:
			s.unlock()
			return 0, s.err
		case s.recv.Len() > 0:
			if len(p) == 0 {
				s.unlock()
				return 0, nil
			}
			n := s.recv.Read(p)
			s.advertise()
			s.unlock()
			return n, nil
		case s.recv.fin && s.recv.End() == s.recv.finOff:
			s.unlock()
			return 0, io.EOF
		case s.state == StateClosed:
			err := s.err
			if err == nil {
				err = io.EOF
			}
			s.unlock()
			return 0, err
		}
		if err := s.await(s.readWaiter(), s.rdl.wait(), nil); err != nil {
			s.unlock()
			return 0, err
		}
	}
}

// Write copies p into the replay buffer and returns once all of it is
// there; it blocks while the buffer is at its limit (backpressure). A
// returned nil error does not mean the peer has the bytes, only that the
// session will deliver them or fail loudly.
func (c *Conn) Write(p []byte) (int, error) {
	s := c.s
	n := 0
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.mu.Lock()
	for {
		switch {
		case s.frozen:
			s.unlock()
			return n, ErrFrozen
		case s.localClosed:
			s.unlock()
			return n, ErrConnClosed
		case s.send.shut:
			s.unlock()
			return n, ErrWriteClosed
		case s.state == StateClosed:
			err := s.err
			if err == nil {
				err = ErrClosedByPeer
			}
			s.unlock()
			return n, err
		}
		if len(p) == 0 {
			s.unlock()
			return n, nil
		}
		if s.wdl.passed() {
			s.unlock()
			return n, errDeadline
		}
		room, full := s.sendRoom()
		if room > 0 {
			k := min(room, len(p))
			s.send.Write(p[:k])
			p, n = p[k:], n+k
			s.kick()
			continue
		}
		if err := s.await(s.writeWaiter(), s.wdl.wait(), full); err != nil {
			s.unlock()
			return n, err
		}
	}
}

// CloseWrite ends our direction of the stream after everything written so
// far: the peer reads io.EOF after the last byte. Reading goes on.
func (c *Conn) CloseWrite() error {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	if s.localClosed {
		return ErrConnClosed
	}
	if s.state == StateClosed {
		return s.errOrClosed()
	}
	if !s.send.shut {
		s.send.shut = true
		s.wakeWriters()
		s.kick()
	}
	return nil
}

// Close ends the session in order: what was written is delivered, the peer
// reads io.EOF, then the session ends. Bytes that arrive after Close are
// discarded. Close returns when the session's goroutines have exited; if the
// peer does not acknowledge within LingerTimeout the session is aborted
// with CodeTimeout.
//
// Close (or Reset) of a frozen session only releases it here (Release):
// it belongs to the hand-over, and nothing is sent.
func (c *Conn) Close() error {
	s := c.s
	s.mu.Lock()
	if s.frozen {
		s.unlock()
		c.Release()
		s.wg.Wait()
		return nil
	}
	if s.localClosed {
		s.unlock()
		return ErrConnClosed
	}
	s.localClosed = true
	s.rdl.stop()
	s.wdl.stop()
	if s.state != StateClosed {
		s.closeRequested = true
		s.send.shut = true
		s.recv.shut = true
		s.recv.Drop() // not Discard: a WriteTo may be writing from it
		s.advertise()
		s.kick()
		s.maybeFinish()
	}
	s.wakeReaders()
	s.wakeWriters()
	s.unlock()

	linger := time.NewTimer(s.cfg.LingerTimeout)
	defer linger.Stop()
	select {
	case <-s.done:
	case <-linger.C:
		s.mu.Lock()
		s.abort(frame.CodeTimeout, "close: peer did not acknowledge in time")
		s.unlock()
	}
	s.wg.Wait()
	return nil
}

// Reset aborts the session: the peer gets RESET with code (use
// frame.CodeAppReset for an application's RST) and both ends drop what
// they buffered. It returns when the session's goroutines have exited.
func (c *Conn) Reset(code Code, reason string) error {
	s := c.s
	s.mu.Lock()
	if s.frozen {
		s.unlock()
		c.Release()
		s.wg.Wait()
		return nil
	}
	s.localClosed = true
	s.abort(code, reason)
	s.unlock()
	s.wg.Wait()
	return nil
}

func (s *session) errOrClosed() error {
	if s.err != nil {
		return s.err
	}
	return ErrClosedByPeer
}

// SetDeadline sets the read and write deadlines (net.Conn).
func (c *Conn) SetDeadline(t time.Time) error {
	c.s.rdl.set(t)
	c.s.wdl.set(t)
	return nil
}

// SetReadDeadline sets the read deadline (net.Conn).
func (c *Conn) SetReadDeadline(t time.Time) error { c.s.rdl.set(t); return nil }

// SetWriteDeadline sets the write deadline (net.Conn).
func (c *Conn) SetWriteDeadline(t time.Time) error { c.s.wdl.set(t); return nil }

// LocalAddr is the local address of the current (or last) link.
func (c *Conn) LocalAddr() net.Addr {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	if s.last == nil {
		return sessionAddr{s.id}
	}
	return s.last.conn.LocalAddr()
}

// RemoteAddr is the remote address of the current (or last) link.
func (c *Conn) RemoteAddr() net.Addr {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	if s.last == nil {
		return sessionAddr{s.id}
	}
	return s.last.conn.RemoteAddr()
}

type sessionAddr struct{ id SessionID }

func (a sessionAddr) Network() string { return "lifeline" }
func (a sessionAddr) String() string  { return a.id.String() }

// SessionID identifies the session on both ends.
func (c *Conn) SessionID() SessionID {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	return c.s.id
}

// Route is the route name the client asked for in HELLO.
func (c *Conn) Route() string { return c.s.route }

// State is the session's current state.
func (c *Conn) State() State {
	c.s.mu.Lock()
	defer c.s.unlock()
	return c.s.state
}

// Confirmed reports whether the client has shown it holds the session (a
// frame after WELCOME, or a valid resume). A gateway hands out only
// confirmed sessions; Server.Sessions also lists the others. Always true
// on the client side.
func (c *Conn) Confirmed() bool {
	if c.s.cl != nil {
		return true
	}
	return isClosed(c.s.gw.confirmed)
}

// ReconnectTimeout is the negotiated reconnect timeout (0: resumption off).
func (c *Conn) ReconnectTimeout() time.Duration { return c.s.reconnectTimeout }

// Stats returns a snapshot of the session's counters.
func (c *Conn) Stats() Stats {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	return s.snapshot()
}

// Done is closed when the session reaches CLOSED.
func (c *Conn) Done() <-chan struct{} { return c.s.done }

// Err is why the session ended: nil while it runs or after an orderly end.
func (c *Conn) Err() error {
	c.s.mu.Lock()
	defer c.s.unlock()
	return c.s.err
}

// GoAway asks the client to move the session to a new link (GameLift's
// backend-initiated reconnection). Only the gateway side may call it; the
// old link keeps carrying data until the new one is attached.
func (c *Conn) GoAway(reason string) error { return c.GoAwayTo("", reason) }

// GoAwayTo is GoAway to another gateway address ("host:port"; empty: the
// same one): the client dials its new link there, and every later one
// (Config.DialAddr). The address must reach this same gateway process,
// which holds the session, e.g. another of its listeners.
func (c *Conn) GoAwayTo(addr, reason string) error {
	s := c.s
	if len(addr) > frame.MaxAddr {
		return newError(frame.CodeValidation, s.id, "GOAWAY address longer than %d bytes", frame.MaxAddr)
	}
	s.mu.Lock()
	defer s.unlock()
	if s.cl != nil {
		return newError(frame.CodeValidation, s.id, "GoAway is for the gateway side")
	}
	if s.link == nil {
		return newError(frame.CodeConflict, s.id, "no link attached")
	}
	s.link.goAway = &frame.GoAway{Code: frame.CodeNone, Addr: addr, Reason: reason}
	s.kick()
	return nil
}

// Kill drops the current link without telling the peer, as a network
// failure would. For tests and for operators who want to force a resume.
func (c *Conn) Kill() {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	if s.link != nil {
		s.detach(errKilled)
	}
}

// A SocketSource is a reader of a TCP socket that Conn.ReadFrom may read
// around its Read method: with a read(2) that does not wait for the socket
// to be readable first, and on Linux, for bulk over a TCP link, with
// splice(2), which sends the bytes to the peer without a second copy. What
// ReadFrom reads that way it reports to Consumed, as Read would have
// returned it. A *net.TCPConn itself gets the same.
type SocketSource interface {
	io.Reader
	// TCPConn is the socket Read reads.
	TCPConn() *net.TCPConn
	// Consumed reports a read that ReadFrom made without Read.
	Consumed(n int, err error)
}

// ReadFrom fills the replay buffer straight from r until r's EOF (which it
// does not pass on: call CloseWrite). It saves the copy through a user
// buffer that io.Copy(conn, src) would make, and from a TCP socket (or a
// SocketSource) over a TCP link, for bulk, the copy from the buffer to the
// link as well (txSplice).
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	c.s.wmu.Lock()
	defer c.s.wmu.Unlock()
	f := newFeed(c.s, r)
	f.off.Store(true) // wait in this goroutine
	_, err := f.run()
	return f.total, err
}

// NewFeed prepares ReadFrom from a socket without a goroutine of ours
// waiting while the socket is idle. Once started, the Feed reads in the
// calling goroutine until the socket has nothing and returns; a goroutine
// waits for more for a moment (idleBeforeShared, as a link's reader), then
// (on Linux) registers the socket with the process's shared poller and
// ends, and another continues the reads once the socket is readable. done is
// called once, with what ReadFrom would return, when the reads end:
// possibly before Start returns, in whichever goroutine read last.
//
// While the reads are parked in the poller nothing but the socket's
// readiness wakes them: not its deadline, not its close (epoll forgets a
// closed descriptor without an event). So before closing src's socket or
// setting its read deadline, whoever does it calls Unpark (before Start
// too), which moves the reads to a goroutine that waits the ordinary way
// from then on and sees the close or the deadline as ReadFrom would.
func (c *Conn) NewFeed(src SocketSource, done func(n int64, err error)) *Feed {
	f := newFeed(c.s, src)
	f.done = done
	return f
}

// Start starts the reads (once). From here until done is called the Feed
// holds the session's write lock, parked or not: a Write or ReadFrom on
// the Conn meanwhile waits for the Feed to end (the sidecars never do
// either; one Feed is the session's only writer).
func (f *Feed) Start() {
	f.s.wmu.Lock() // until done: another goroutine may unlock it
	if !sharedPollerOK {
		// No shared poller here: the reads need a goroutine.
		f.off.Store(true)
		go f.goOn()
		return
	}
	f.startup = true
	f.goOn()
}

// Unpark makes the reads wait in a goroutine from now on; reads parked in
// the shared poller continue in one at once. See NewFeed.
func (f *Feed) Unpark() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.off.Store(true)
	if f.id != 0 && readPoller.unregister(f.id) {
		f.id = 0
		go f.goOn()
	}
}

// A Feed is one ReadFrom from a socket whose reads may park in the
// shared poller (Conn.NewFeed); its state is kept between the turns.
type Feed struct {
	s        *session
	r        io.Reader
	rc       syscall.RawConn
	sock     *net.TCPConn
	consumed func(int, error)
	total    int64
	readable bool
	// bulk: the last read filled at least txBulkMin, so the next may go
	// through the splice path. A request stream stays on plain reads,
	// two syscalls per message where splicing would take five.
	bulk bool
	done func(int64, error) // Feed's

	mu sync.Mutex
	// off: the reads wait in a goroutine from now on (ReadFrom, Unpark,
	// no shared poller).
	off atomic.Bool
	// id is the registration in the shared poller while parked; 0
	// otherwise.
	id uint64
	// startup: the caller's goroutine runs the first turn (it does not
	// wait for the socket: a goroutine of ours does).
	startup bool
}

func newFeed(s *session, r io.Reader) *Feed {
	f := &Feed{s: s, r: r, consumed: func(int, error) {}}
	switch src := r.(type) {
	case *net.TCPConn:
		f.sock = src
	case SocketSource:
		f.sock, f.consumed = src.TCPConn(), src.Consumed
	}
	if f.sock != nil {
		f.rc, _ = f.sock.SyscallConn()
	} else if sc, ok := r.(syscall.Conn); ok {
		f.rc, _ = sc.SyscallConn()
	}
	if f.rc == nil {
		f.sock = nil
	}
	return f
}

// goOn runs the reads until they park or end; at the end it lets go of
// the write lock and calls done.
func (f *Feed) goOn() {
	parked, err := f.run()
	if parked {
		return
	}
	f.s.wmu.Unlock()
	f.done(f.total, err)
}

// park registers the socket with the shared poller: the caller returns
// and fired continues. False: wait the ordinary way.
func (f *Feed) park() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.off.Load() {
		return false
	}
	id, err := readPoller.register(f, f.rc)
	if err != nil {
		f.off.Store(true)
		return false
	}
	f.id = id
	return true
}

// fired continues reads parked under registration id (the dispatcher
// calls it once the socket is readable).
func (f *Feed) fired(id uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.id != id {
		return // Unpark took it
	}
	f.id = 0
	go f.goOn()
}

// waitSource waits until the socket is readable: in this goroutine for
// up to idleBeforeShared, as a link's reader does (a request stream's next
// message, or bulk's next segment, comes without the shared poller's extra
// hop), then parked in the shared poller (parked true: return at once,
// without touching f). Called without s.mu.
func (f *Feed) waitSource() (parked bool, err error) {
	if f.startup {
		// The first turn runs in the caller's goroutine, which must not
		// wait here: go on in a fresh one.
		f.startup = false
		go f.goOn()
		return true, nil
	}
	f.mu.Lock()
	staged := !f.off.Load()
	if staged {
		f.sock.SetReadDeadline(time.Now().Add(idleBeforeShared))
	}
	f.mu.Unlock()
	err = waitReadable(f.rc)
	if !staged {
		return false, err
	}
	f.mu.Lock()
	if f.off.Load() {
		f.mu.Unlock()
		// Unparked meanwhile: the deadline is the unparker's now, set
		// after ours, so a timeout may have been ours: wait again.
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = waitReadable(f.rc)
		}
		return false, err
	}
	f.sock.SetReadDeadline(time.Time{})
	f.mu.Unlock()
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return false, err
	}
	if f.park() {
		return true, nil
	}
	return false, waitReadable(f.rc)
}

// run reads until the source ends or fails (parked false; err as ReadFrom
// returns it, f.total the bytes read) or until the reads parked in the
// shared poller (parked true: f now belongs to fired or unpark).
func (f *Feed) run() (parked bool, err error) {
	s := f.s
	s.mu.Lock()
	for {
		if err := s.writeErr(); err != nil {
			s.unlock()
			return false, err
		}
		room, full := s.sendRoom()
		if room <= 0 {
			if err := s.await(s.writeWaiter(), s.wdl.wait(), full); err != nil {
				s.unlock()
				return false, err
			}
			continue
		}
		if f.bulk && f.sock != nil {
			max, busy := s.txSpliceRoom(room)
			if busy != nil {
				if err := s.await(busy, s.wdl.wait(), nil); err != nil {
					s.unlock()
					return false, err
				}
				continue
			}
			if max > 0 {
				s.unlock()
				n, err, werr := s.spliceSend(f.rc, max, !f.off.Load())
				if err == errSourceEmpty {
					// Nothing now: wait as a request stream does (where
					// the reads may park).
					err, f.bulk = nil, false
				} else {
					f.bulk = n >= txBulkMin
				}
				f.consumed(n, err)
				f.total += int64(n)
				s.mu.Lock()
				switch {
				case werr != nil:
					s.unlock()
					return false, werr
				case err != nil:
					return false, s.readFromEnd(err)
				}
				continue
			}
		}
		if f.sock == nil && f.rc != nil && !f.readable {
			// Wait for data before lending out the buffer's tail: an idle
			// session (the request sent, acked, the next one not yet
			// written) must not keep a chunk for bytes that may never
			// come. One poll(2) per read: cheap next to the copy.
			s.unlock()
			err := waitReadable(f.rc)
			s.mu.Lock()
			if err != nil {
				f.rc = nil // not a socket we can wait on: just read
			}
			f.readable = true
			continue
		}
		f.readable = false
		tail := s.send.Tail()
		if len(tail) > room {
			tail = tail[:room]
		}
		s.unlock()
		var n int
		var err error
		if f.sock != nil {
			// Read without waiting; wait (then lending no buffer) only
			// when the socket had nothing.
			var ready bool
			n, ready, err = readNow(f.sock, f.rc, tail)
			if !ready {
				s.mu.Lock()
				s.send.Commit(0) // gives back a chunk taken for this read
				s.unlock()
				parked, err := f.waitSource()
				if parked {
					return true, nil
				}
				if err != nil {
					f.sock = nil // cannot wait on it: read the ordinary way
				}
				s.mu.Lock()
				continue
			}
			f.consumed(n, err)
		} else {
			n, err = f.r.Read(tail)
		}
		f.bulk = n >= txBulkMin
		s.mu.Lock()
		if n > 0 {
			if werr := s.writeErr(); werr != nil && werr != ErrFrozen {
				// Closed while we read: the bytes cannot be sent. (Frozen
				// ones are kept: they go to the next process.)
				s.send.Commit(0)
				s.unlock()
				return false, werr
			}
			s.send.Commit(n)
			f.total += int64(n)
			s.sendCommitted(err == nil)
		} else {
			s.send.Commit(0)
		}
		if err != nil {
			return false, s.readFromEnd(err)
		}
	}
}

// txBulkMin is the read that makes ReadFrom take the splice path for the
// next (a request of a request stream is smaller; spliceSend).
const txBulkMin = 16 << 10

// sendCommitted sends bytes just put into the replay buffer: from here if
// inline (and no writer runs), else by kicking the writer. Caller holds
// mu, which this releases and takes again.
func (s *session) sendCommitted(inline bool) {
	if l := s.claimWriter(); l != nil && inline {
		// Send it from here: one hand-off less per message.
		s.unlock()
		l.sendInline()
		s.mu.Lock()
		return
	} else if l != nil {
		l.writerExit(false) // not ours to send after all
	}
	s.kick()
}

// readFromEnd is what ReadFrom returns after its source failed with err
// (not nil): nil for EOF. Caller holds mu, which this releases.
func (s *session) readFromEnd(err error) error {
	frozen := s.frozen
	s.unlock()
	switch {
	case err == io.EOF:
		return nil
	case frozen: // the caller interrupted the read for a hand-over
		return ErrFrozen
	}
	return err
}

// writeErr is why Write cannot proceed, or nil. Caller holds mu.
func (s *session) writeErr() error {
	switch {
	case s.frozen: // also once released: the session lives elsewhere
		return ErrFrozen
	case s.localClosed:
		return ErrConnClosed
	case s.send.shut:
		return ErrWriteClosed
	case s.state == StateClosed:
		return s.errOrClosed()
	}
	return nil
}

// WriteTo writes received bytes to w, straight from the receive buffer (one
// writev per batch on a TCP socket), until the peer's CloseWrite; then it
// returns nil, as io.Copy expects.
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	s := c.s
	s.rmu.Lock()
	defer s.rmu.Unlock()
	var total int64
	var segs [][]byte
	s.mu.Lock()
	for {
		wait, done, err := s.writeToStep(w, &segs, &total)
		if done {
			s.unlock()
			return total, err
		}
		if wait {
			if err := s.await(s.readWaiter(), s.rdl.wait(), nil); err != nil {
				s.unlock()
				return total, err
			}
		}
	}
}

// writeToStep is one step of WriteTo: it writes one batch of what is
// received to w, or says that WriteTo returns now (done, with err) or
// waits for more (wait). Caller holds rmu and mu; mu is held on return.
func (s *session) writeToStep(w io.Writer, segs *[][]byte, total *int64) (wait, done bool, err error) {
	switch {
	case s.frozen:
		return false, true, ErrFrozen
	case s.localClosed:
		return false, true, ErrConnClosed
	case s.aborted:
		return false, true, s.err
	case s.recv.Len() > 0:
		start := s.recv.Start()
		*segs = s.recv.Slices((*segs)[:0], start, min(s.recv.Len(), writeBatch))
		s.unlock()
		bufs := net.Buffers(*segs)
		n, err := bufs.WriteTo(w)
		*total += n
		s.mu.Lock()
		if s.recv.Start() == start { // not dropped by Close or abort meanwhile
			s.recv.Discard(start + uint64(n))
			s.advertise()
		}
		if err != nil {
			if s.frozen { // the caller interrupted the write for a hand-over
				err = ErrFrozen
			}
			return false, true, err
		}
		return false, false, nil
	case s.recv.fin && s.recv.End() == s.recv.finOff:
		return false, true, nil
	case s.state == StateClosed:
		return false, true, s.err
	}
	return true, false, nil
}

// sink is where DeliverTo writes. Under mu.
type sink struct {
	w io.Writer
	// nb writes to w without blocking, when w is a socket: the link's
	// reader writes what it received itself when it can (pumpInline).
	nb io.Writer
	// sp is the socket under w when a tcp link's reader may splice DATA
	// payloads to it (link.spliceData); nil otherwise.
	sp      syscall.RawConn
	done    func(int64, error)
	total   int64
	segs    [][]byte
	running bool // a pump goroutine runs
	ended   bool // done was (or is being) called
}

// DeliverTo is WriteTo without a goroutine waiting in it: the session
// writes received bytes to w itself, from a goroutine that runs only while
// there is something to write (or an end to report), so that an idle
// session keeps none. done is called once, from that goroutine, with what
// WriteTo would have returned, and the goroutine returns right after it.
// The read deadline does not apply; Read and WriteTo must not be called
// meanwhile, nor DeliverTo again.
func (c *Conn) DeliverTo(w io.Writer, done func(n int64, err error)) {
	s := c.s
	s.mu.Lock()
	defer s.unlock()
	s.sink = &sink{w: w, done: done}
	if sc, ok := w.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			s.sink.nb = nonBlocking(rc)
		}
	}
	if s.sink.nb != nil {
		if s.sink.sp = spliceConn(w); s.sink.sp != nil {
			s.spliceSink.Store(true)
		}
	}
	s.kickSink() // it may have ended, or hold bytes, already
}

// kickSink starts a pump unless one runs or the sink has ended: called
// wherever readers are woken. Caller holds mu.
func (s *session) kickSink() {
	if k := s.sink; k != nil && !k.running && !k.ended {
		k.running = true
		// Not tracked by wg: its owner is DeliverTo's caller, which
		// waits for done (and may call Reset, which waits for wg, from
		// done).
		go s.pump(k)
	}
}

// claimSink makes the caller the sink's pump, if none runs, to write what
// was just received without waking another goroutine: it must call
// pumpInline after releasing mu. Caller holds mu.
func (s *session) claimSink() bool {
	k := s.sink
	if k == nil || k.running || k.ended || k.nb == nil {
		return false
	}
	k.running = true
	return true
}

// pumpInline is a link reader's turn as the sink's pump (claimSink): it
// writes what it can without blocking and leaves the rest, an error or
// the end to a pump goroutine. One hand-off less per message than waking
// a goroutine to write; and the reader never blocks on the application,
// so ACKs and PINGs keep flowing.
func (s *session) pumpInline() {
	k := s.sink
	if !s.rmu.TryLock() { // a Snapshot is waiting for readers
		go s.pump(k)
		return
	}
	s.mu.Lock()
	s.pumpInlineLocked(k)
}

// pumpInlineLocked is pumpInline once the caller holds rmu and mu as the
// sink's pump; it releases both.
func (s *session) pumpInlineLocked(k *sink) {
	for {
		wait, done, _ := s.writeToStep(k.nb, &k.segs, &k.total)
		if done {
			// Blocked, failed or ended: a goroutine goes on from here
			// and reports the end (done may Reset the session, which
			// waits for this reader).
			s.unlock()
			s.rmu.Unlock()
			go s.pump(k)
			return
		}
		if wait {
			k.running = false
			clear(k.segs)
			s.unlock()
			s.rmu.Unlock()
			return
		}
	}
}

// errWouldBlock: a non-blocking write wrote less than asked.
var errWouldBlock = errors.New("resume: write would block")

// pump writes what the receive buffer holds to the sink until it is empty,
// then returns; at the stream's end it reports it with done.
func (s *session) pump(k *sink) {
	s.rmu.Lock()
	s.mu.Lock()
	for {
		wait, done, err := s.writeToStep(k.w, &k.segs, &k.total)
		if !wait && !done {
			continue
		}
		// Under mu: a wake-up after this sees running false and starts
		// the next pump.
		k.running = false
		k.ended = done
		clear(k.segs) // an idle session keeps no reference to a chunk
		s.unlock()
		s.rmu.Unlock()
		if done {
			k.done(k.total, err)
		}
		return
	}
}

// await waits, with mu released, until wake or also (if not nil) is
// closed or the deadline passes. Caller holds mu; it is held again on
// return.
func (s *session) await(wake, deadline, also chan struct{}) error {
	s.unlock()
	defer s.mu.Lock()
	select {
	case <-wake:
		return nil
	case <-also:
		return nil
	case <-deadline:
		return errDeadline
	}
}

// sendRoom is how many bytes a writer may add to the replay buffer now.
// When it is 0 because the shared memory budget is exhausted, full is
// closed once memory is released elsewhere. At the budget a session may
// still fill one chunk, so that every session makes progress. Caller holds
// mu.
func (s *session) sendRoom() (room int, full chan struct{}) {
	room = s.sendLimit() - s.send.Len()
	if room <= 0 || s.budget == nil {
		return room, nil
	}
	if full = s.budget.full(); full != nil {
		if room = min(room, chunkSize-s.send.Len()); room > 0 {
			return room, nil
		}
	}
	return room, full
}
