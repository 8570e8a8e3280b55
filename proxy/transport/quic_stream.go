package transport

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/quic-go/quic-go"
)

// quicStream is a QUIC stream as a link, with TCP-like semantics:
//
//   - Close sends a FIN after what was written (a RESET_STREAM instead when
//     a Write is blocked, so that it returns at once), unblocks a pending
//     Read, and after quicCloseGrace aborts reading (STOP_SENDING), which
//     releases the stream for good. The grace lets the peer read our last
//     frames and the FIN before its own writes start failing, as a TCP
//     peer reads up to the FIN before a write of its own draws an RST.
//   - A peer's RESET_STREAM or STOP_SENDING, or its CONNECTION_CLOSE, fails
//     Read and Write with an error that wraps the *quic.StreamError (or
//     *quic.ApplicationError) and syscall.ECONNRESET: the session engine
//     sees a peer reset, as on TCP. The peer's FIN reads as io.EOF.
//   - Our connection's death (idle timeout, stateless reset) fails every
//     stream with quic-go's error. Flow control blocks Write (backpressure).
type quicStream struct {
	str    *quic.Stream
	qc     *quic.Conn
	graces *graceTimers // of the listener or dialer that made the stream

	closed  atomic.Bool
	mu      sync.Mutex
	writing int // Writes in progress, under mu
}

// The session engine binds its proofs to a link with the TLS exporter.
var _ interface {
	ExportKeyingMaterial(label string, context []byte, length int) ([]byte, error)
} = (*quicStream)(nil)

// quicCloseGrace is how long a closed link keeps accepting (and dropping)
// the peer's data before it sends STOP_SENDING.
const quicCloseGrace = time.Second

func newQUICStream(str *quic.Stream, qc *quic.Conn, graces *graceTimers) *quicStream {
	return &quicStream{str: str, qc: qc, graces: graces}
}

// peerError marks the peer's cancellations as connection resets.
func peerError(err error) error {
	var se *quic.StreamError
	var ae *quic.ApplicationError
	if errors.As(err, &se) && se.Remote || errors.As(err, &ae) && ae.Remote {
		return fmt.Errorf("%w (%w)", err, syscall.ECONNRESET)
	}
	return err
}

func (s *quicStream) Read(p []byte) (int, error) {
	if s.closed.Load() {
		return 0, net.ErrClosed
	}
	n, err := s.str.Read(p)
	if err != nil {
		if s.closed.Load() {
			return n, net.ErrClosed
		}
		err = peerError(err)
	}
	return n, err
}

func (s *quicStream) Write(p []byte) (int, error) {
	s.mu.Lock()
	if s.closed.Load() {
		s.mu.Unlock()
		return 0, net.ErrClosed
	}
	s.writing++
	s.mu.Unlock()
	n, err := s.str.Write(p)
	s.mu.Lock()
	s.writing--
	s.mu.Unlock()
	if err != nil {
		if s.closed.Load() {
			return n, net.ErrClosed
		}
		err = peerError(err)
	}
	return n, err
}

func (s *quicStream) Close() error {
	s.mu.Lock()
	if s.closed.Swap(true) {
		s.mu.Unlock()
		return nil
	}
	busy := s.writing > 0
	s.mu.Unlock()
	s.str.SetReadDeadline(time.Unix(1, 0)) // wakes a pending Read
	if busy {
		// quic-go's Close does not unblock a Write waiting for flow
		// control credit; a reset does.
		s.str.CancelWrite(quicStreamClosed)
	} else {
		s.str.Close() // FIN after what was written; no Write can start now
	}
	s.graces.after(quicCloseGrace, func() { s.str.CancelRead(quicStreamClosed) })
	return nil
}

// ExportKeyingMaterial exports keying material from the TLS session of
// the link's QUIC connection (the TLS exporter, RFC 8446 section 7.5;
// RFC 9001 section 7), as (*tls.ConnectionState).ExportKeyingMaterial
// does for a TLS link. The session engine binds its HELLO and RESUME
// proofs to the link with it, so that a proof recorded on one connection
// is worthless on another. Both ends of a connection export the same
// bytes; every stream of one connection does too (they share its TLS
// session, which no one else can open streams on), and two connections
// export different bytes.
func (s *quicStream) ExportKeyingMaterial(label string, context []byte, length int) ([]byte, error) {
	cs := s.qc.ConnectionState().TLS
	return cs.ExportKeyingMaterial(label, context, length)
}

func (s *quicStream) LocalAddr() net.Addr                { return s.qc.LocalAddr() }
func (s *quicStream) RemoteAddr() net.Addr               { return s.qc.RemoteAddr() }
func (s *quicStream) SetWriteDeadline(t time.Time) error { return s.str.SetWriteDeadline(t) }

func (s *quicStream) SetReadDeadline(t time.Time) error {
	if s.closed.Load() {
		return nil // keep the deadline Close set
	}
	return s.str.SetReadDeadline(t)
}

func (s *quicStream) SetDeadline(t time.Time) error {
	s.SetReadDeadline(t)
	return s.SetWriteDeadline(t)
}

// graceTimers owns the close graces of the streams of one listener or
// dialer: each runs its function when its time is up, or at once when the
// owner stops them (its Close), which returns only after every function
// has run. No grace outlives its owner.
type graceTimers struct {
	mu      sync.Mutex
	pending map[uint64]*grace // under mu
	next    uint64
	stopped bool
	wg      sync.WaitGroup // functions not yet run
}

type grace struct {
	f func()
	t *time.Timer
}

// after runs f after d, or when stop is called, whichever comes first;
// at once if stop was called already.
func (g *graceTimers) after(d time.Duration, f func()) {
	g.mu.Lock()
	if g.stopped {
		g.mu.Unlock()
		f()
		return
	}
	defer g.mu.Unlock()
	if g.pending == nil {
		g.pending = map[uint64]*grace{}
	}
	id := g.next
	g.next++
	g.wg.Add(1)
	// Whoever takes it out of pending, the timer or stop, runs f. The
	// timer's function takes mu, so it finds the entry made here.
	g.pending[id] = &grace{f: f, t: time.AfterFunc(d, func() {
		if gr := g.take(id); gr != nil {
			defer g.wg.Done()
			gr.f()
		}
	})}
}

func (g *graceTimers) take(id uint64) *grace {
	g.mu.Lock()
	defer g.mu.Unlock()
	gr := g.pending[id]
	delete(g.pending, id)
	return gr
}

// stop runs every pending function now and waits for those the timers
// are running. Later calls of after run their function at once.
func (g *graceTimers) stop() {
	g.mu.Lock()
	g.stopped = true
	grs := g.pending
	g.pending = nil
	g.mu.Unlock()
	for _, gr := range grs {
		gr.t.Stop()
		gr.f()
		g.wg.Done()
	}
	g.wg.Wait()
}
