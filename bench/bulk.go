package bench

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// The throughput load generator and its upstream. A stream starts with a
// mode byte: 'U' the client uploads until its deadline, then half-closes;
// 'D' the server sends until the client's FIN; 'B' both at once. In
// upper case the stream is bulk: the sender sends a constant file with
// sendfile(2) and the receiver splices what arrives into /dev/null, so
// that neither touches a byte in user space and the generator's own
// ceiling (the direct row) stays far above what a proxy can carry. In
// lower case ('u', 'd', 'b') it verifies: the sender writes a fixed
// pattern and the receiver compares every byte with it.

// bulkFileSize is the size of the file the bulk sender sends over and
// over; bulkChunk is one sendfile call's worth, so that a sender stops
// within a chunk of its deadline.
const (
	bulkFileSize = 8 << 20
	bulkChunk    = 1 << 20
)

// writeBulkFile writes the constant file bulk senders send.
func writeBulkFile(path string) error {
	b := make([]byte, 64<<10)
	for i := range b {
		b[i] = byte(i * 7)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	for range bulkFileSize / len(b) {
		if _, err := f.Write(b); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// verifyPeriod is the length of the verify mode's pattern: a prime, so
// that a byte lost, duplicated or moved anywhere changes what follows.
const verifyPeriod = 65521

// verifyStream is the pattern, repeated so that any offset in
// [0, verifyPeriod) starts a contiguous chunk of verifyChunk bytes.
var verifyStream = func() []byte {
	const chunk = 64 << 10
	rng := rand.New(rand.NewPCG(10, 14))
	b := make([]byte, verifyPeriod+chunk)
	for i := range b {
		if i < verifyPeriod {
			b[i] = byte(rng.Uint32())
		} else {
			b[i] = b[i-verifyPeriod]
		}
	}
	return b
}()

const verifyChunk = 64 << 10

// errMismatch: a verifying receiver got other bytes than were sent.
var errMismatch = errors.New("received bytes differ from the pattern sent")

// sendStream sends until stopped says so: the bulk file (sendfile) or the
// pattern. It returns the bytes sent.
func sendStream(c *net.TCPConn, verify bool, file string, stopped func() bool) (int64, error) {
	var total int64
	if verify {
		off := 0
		for !stopped() {
			n, err := c.Write(verifyStream[off : off+verifyChunk])
			total += int64(n)
			off = (off + n) % verifyPeriod
			if err != nil {
				return total, err
			}
		}
		return total, nil
	}
	f, err := os.Open(file)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	for !stopped() {
		n, err := c.ReadFrom(&io.LimitedReader{R: f, N: bulkChunk})
		total += n
		if err != nil {
			return total, err
		}
		if n < bulkChunk { // end of the file: again from the start
			if _, err := f.Seek(0, io.SeekStart); err != nil {
				return total, err
			}
		}
	}
	return total, nil
}

// receiveStream reads until EOF: into /dev/null with splice(2), or
// checking every byte against the pattern. It returns the bytes read; a
// verifying receiver that saw a difference returns errMismatch (and goes
// on reading to EOF, so that the sender is not blocked).
func receiveStream(c *net.TCPConn, verify bool) (int64, error) {
	if !verify {
		null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		if err != nil {
			return 0, err
		}
		defer null.Close()
		return null.ReadFrom(c)
	}
	buf := make([]byte, verifyChunk)
	var total int64
	var bad error
	for {
		n, err := c.Read(buf)
		if bad == nil && n > 0 {
			off := int(total % verifyPeriod)
			if !bytes.Equal(buf[:n], verifyStream[off:off+n]) {
				bad = fmt.Errorf("%w (in the %d bytes after byte %d)", errMismatch, n, total)
			}
		}
		total += int64(n)
		if err == io.EOF {
			return total, bad
		}
		if err != nil {
			return total, err
		}
	}
}

// bulk is the throughput upstream: uploaded bytes are counted in up,
// streams whose upload differed from the pattern in mismatches.
type bulk struct {
	file       string // the bulk file
	up         atomic.Int64
	mismatches atomic.Int64
}

func (b *bulk) handle(c *net.TCPConn) {
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	verify := mode[0] >= 'a'
	m := mode[0] &^ 0x20 // upper case
	var stop atomic.Bool
	var wg sync.WaitGroup
	if m == 'D' || m == 'B' {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sendStream(c, verify, b.file, stop.Load)
		}()
	}
	n, err := receiveStream(c, verify)
	b.up.Add(n)
	if errors.Is(err, errMismatch) {
		b.mismatches.Add(1)
	}
	stop.Store(true)
	wg.Wait()
	c.CloseWrite()
}

// bulkStream runs one throughput stream for d and returns the bytes it
// received. It half-closes after d; the server then stops too, and the
// stream ends at the server's FIN.
func bulkStream(addr string, mode byte, verify bool, file string, d time.Duration) (int64, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	tc := c.(*net.TCPConn)
	if verify {
		mode |= 0x20 // lower case
	}
	if _, err := tc.Write([]byte{mode}); err != nil {
		return 0, err
	}
	end := time.Now().Add(d)
	werr := make(chan error, 1)
	go func() {
		if mode == 'U' || mode == 'B' || mode == 'u' || mode == 'b' {
			if _, err := sendStream(tc, verify, file, func() bool { return !time.Now().Before(end) }); err != nil {
				werr <- err
				return
			}
		} else {
			time.Sleep(time.Until(end))
		}
		werr <- tc.CloseWrite()
	}()
	tc.SetReadDeadline(end.Add(60 * time.Second))
	got, err := receiveStream(tc, verify)
	if err != nil && !errors.Is(err, errMismatch) {
		tc.Close()
		<-werr
		return got, err
	}
	if werr := <-werr; werr != nil {
		return got, werr
	}
	return got, err
}
