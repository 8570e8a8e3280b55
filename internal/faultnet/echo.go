package faultnet

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync/atomic"
	"time"
)

// ErrMismatch is wrapped by Echo's error when what came back differs from
// what was sent (as opposed to a connection that failed).
var ErrMismatch = errors.New("echo mismatch")

// Echo sends a seeded random stream through an echo service and checks
// that exactly the same bytes come back, in order, then the echo's FIN
// after the stream's own: the check that tests, the demo and the
// benchmark's soak run across broken links. The zero value of every field
// but Seed and one of Size or Stop is a sensible default.
type Echo struct {
	// Seed selects the data (a ChaCha8 stream, so that the reader
	// regenerates it whatever the chunking) and the sizes of the writes.
	Seed uint64
	// Size is how many bytes to send; 0: until Stop is closed.
	Size int64
	// Stop ends the stream early (or, with Size 0, at all): the writer
	// half-closes, and Run checks that all it wrote came back.
	Stop <-chan struct{}
	// MaxWrite bounds the random size of each write: 1 to MaxWrite bytes
	// (0: 64 KiB).
	MaxWrite int
	// MaxPause, if set, paces the writer: after each write it sleeps a
	// random whole number of milliseconds from 1 to MaxPause.
	MaxPause time.Duration
	// Timeout is how long a read, a write or the dial may wait without
	// progress (0: 60 s).
	Timeout time.Duration
	// Verified, if set, counts the bytes that came back and matched.
	Verified *atomic.Int64
	// HoldAt and Hold: once HoldAt bytes are written the writer waits for
	// Hold to close (to act on the link while data is in flight).
	HoldAt int64
	Hold   <-chan struct{}
	// MarkAt and Mark: Mark is called once, when MarkAt bytes have come
	// back.
	MarkAt int64
	Mark   func()
}

// stopPoll is how often a writer blocked by backpressure looks at Stop.
const stopPoll = 500 * time.Millisecond

// Dial connects to addr over TCP and runs the check on that connection.
func (e Echo) Dial(addr string) error {
	c, err := net.DialTimeout("tcp", addr, e.timeout())
	if err != nil {
		return err
	}
	defer c.Close()
	return e.Run(c)
}

func (e Echo) timeout() time.Duration {
	if e.Timeout <= 0 {
		return 60 * time.Second
	}
	return e.Timeout
}

// Run runs the check on c, which must have a CloseWrite method (a TCP
// connection, a session). On failure Run closes c to stop its writer; it
// returns only when its writer has ended.
func (e Echo) Run(c net.Conn) error {
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		return fmt.Errorf("echo: %T cannot half-close", c)
	}
	var key [32]byte
	for i := range 4 {
		for j := range 8 {
			key[i*8+j] = byte(e.Seed >> (8 * j))
		}
		key[i*8] ^= byte(i)
	}
	quit := make(chan struct{})
	var written atomic.Int64
	werr := make(chan error, 1)
	go func() { werr <- e.write(c, cw, rand.NewChaCha8(key), quit, &written) }()
	fail := func(err error) error {
		close(quit)
		c.Close()
		<-werr
		return err
	}

	exp := rand.NewChaCha8(key)
	buf := make([]byte, 64<<10)
	want := make([]byte, len(buf))
	var got int64
	marked := e.Mark == nil
	for {
		c.SetReadDeadline(time.Now().Add(e.timeout()))
		n, err := c.Read(buf)
		if n > 0 {
			exp.Read(want[:n])
			if !bytes.Equal(buf[:n], want[:n]) {
				return fail(fmt.Errorf("%w at byte %d (after %d bytes verified)", ErrMismatch, got+int64(FirstDiff(buf[:n], want[:n])), got))
			}
			got += int64(n)
			if e.Verified != nil {
				e.Verified.Add(int64(n))
			}
			if !marked && got >= e.MarkAt {
				marked = true
				e.Mark()
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return fail(fmt.Errorf("read after %d bytes: %w", got, err))
		}
	}
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if w := written.Load(); got != w {
		return fmt.Errorf("%w: wrote %d bytes, %d came back", ErrMismatch, w, got)
	}
	return nil
}

// write sends the stream until Size or Stop, then half-closes.
func (e Echo) write(c net.Conn, cw interface{ CloseWrite() error }, data *rand.ChaCha8, quit <-chan struct{}, written *atomic.Int64) error {
	maxWrite := e.MaxWrite
	if maxWrite <= 0 {
		maxWrite = 64 << 10
	}
	sizes := rand.New(rand.NewPCG(e.Seed, 2))
	buf := make([]byte, maxWrite)
	stopped := func() bool {
		select {
		case <-e.Stop:
			return true
		default:
			return false
		}
	}
	// step bounds each Write so that a writer under backpressure sees Stop.
	step := e.timeout()
	if e.Stop != nil {
		step = min(step, stopPoll)
	}
	var off int64
	for (e.Size == 0 || off < e.Size) && !stopped() {
		if e.Hold != nil && off == e.HoldAt {
			select {
			case <-e.Hold:
			case <-e.Stop:
			case <-quit:
				return errors.New("stopped")
			}
		}
		n := int64(1 + sizes.IntN(maxWrite))
		if e.Size > 0 {
			n = min(n, e.Size-off)
		}
		if e.Hold != nil && off < e.HoldAt {
			n = min(n, e.HoldAt-off)
		}
		p := buf[:n]
		data.Read(p)
		progress := time.Now()
		for len(p) > 0 {
			if stopped() {
				break
			}
			c.SetWriteDeadline(time.Now().Add(step))
			m, err := c.Write(p)
			written.Add(int64(m))
			off += int64(m)
			p = p[m:]
			if m > 0 {
				progress = time.Now()
			}
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) && time.Since(progress) < e.timeout() {
					continue // Stop is looked at again; the rest follows
				}
				return err
			}
		}
		if e.MaxPause > 0 {
			time.Sleep(time.Duration(1+sizes.IntN(max(1, int(e.MaxPause/time.Millisecond)))) * time.Millisecond)
		}
	}
	c.SetWriteDeadline(time.Time{})
	return cw.CloseWrite()
}

// FirstDiff is the index of the first byte where a and b differ, or the
// length of the shorter one if it is a prefix of the other.
func FirstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
