package frame

import (
	"bufio"
	"fmt"
	"io"
	"sync"
)

// maxControl is the largest non-DATA payload (a HELLO with the longest
// route and application address).
const maxControl = max(maxHello, 3+MaxAddr+MaxReason)

// Reader decodes frames from a link. It never allocates per frame: control
// payloads are read in place in the read-ahead buffer, DATA payloads by the
// caller straight into its own buffer with ReadData.
type Reader struct {
	src     io.Reader
	size    int
	br      *bufio.Reader // nil until the first header and while parked in an idle wait
	hdr     [HeaderLen]byte
	pending int // DATA bytes of the current frame not yet read
	// idle, if set, blocks until src has something to read (see
	// SetIdleWait).
	idle func() error
	// probe, if set, is src's switch for reads that do not wait, and
	// empty says that an error from such a read means "nothing now"
	// (SetIdleProbe).
	probe func(nowait bool)
	empty func(error) bool
	// settle, if set, ends the first read after an idle wait
	// (SetIdleSettle).
	settle func(err error, empty bool) error
}

// NewReader returns a Reader with a read-ahead buffer of size bytes. It
// takes the buffer once the first frame header has arrived: a handshake
// that finds the connection closed (a reconnect refused, repeated with
// backoff by every session of a sidecar) costs no buffer.
func NewReader(r io.Reader, size int) *Reader {
	return &Reader{src: r, size: size}
}

// readAheads recycles read-ahead buffers between idle readers.
var readAheads sync.Pool

// SetIdleWait makes the Reader give its read-ahead buffer back whenever it
// is empty at a frame boundary, and call wait, which must block until the
// source has data (or an error, returned by Next), before it takes one
// again. An idle link then holds no buffer while it waits. wait nil turns
// this off.
func (r *Reader) SetIdleWait(wait func() error) { r.idle = wait }

// SetIdleSettle is for a source whose reads wait by themselves (a
// socket): the idle wait then only arranges the wait (a read deadline, for
// instance) and returns, and the Reader's read of the next header, still
// without a buffer, is the wait and the read in one. settle ends it: with
// nil once the header is in, or with its error, and empty true if nothing
// of the header came (the Reader is still at a frame boundary). What
// settle returns for an error is Next's error; nil reads on.
func (r *Reader) SetIdleSettle(settle func(err error, empty bool) error) { r.settle = settle }

// SetIdleProbe is for a source that holds bytes of its own which the
// readiness of its socket does not show, as a *tls.Conn holds decrypted
// records and the start of the next one: waiting for the socket could
// then wait for bytes that are already here. Before the idle wait the
// Reader reads once with nowait(true) in effect. A source with nothing
// to give then fails that read with an error for which empty is true
// (and stays usable: for a *tls.Conn, a temporary net.Error), and the
// Reader waits; bytes or any other error it takes as a read returns them.
func (r *Reader) SetIdleProbe(nowait func(on bool), empty func(error) bool) {
	r.probe, r.empty = nowait, empty
}

// Release gives the read-ahead buffer back; the Reader must not be used
// after.
func (r *Reader) Release() {
	if r.br != nil {
		r.park()
	}
}

func (r *Reader) park() {
	r.br.Reset(nil)
	readAheads.Put(r.br)
	r.br = nil
}

// probed reads once without waiting if the source has a probe: ready if
// that read returned bytes; an error other than "nothing now" is the
// read's, as a waiting read would have returned it.
func (r *Reader) probed() (ready bool, err error) {
	if r.probe == nil {
		return false, nil
	}
	r.probe(true)
	_, err = r.br.Peek(1)
	r.probe(false)
	switch {
	case err == nil:
		return true, nil
	case r.empty(err):
		return false, nil
	}
	return false, err
}

// head is where a fixed-size head (the preamble, a frame header) is read
// from: the read-ahead buffer, or the source itself while there is none
// (a new Reader, or one woken from an idle wait). A connection that sends
// nothing, closes, or is reset (thousands at once when a path fails under
// idle sessions; a reconnect refused with backoff by every session of a
// sidecar) then costs no read-ahead buffer, and neither does a reader
// waiting in its read (SetIdleSettle). A DATA payload after such a header
// may then be spliced from the source, not read into the buffer.
func (r *Reader) head() io.Reader {
	if r.br == nil {
		return r.src
	}
	return r.br
}

// wake takes a read-ahead buffer for src.
func (r *Reader) wake() {
	if br, ok := readAheads.Get().(*bufio.Reader); ok && br.Size() == r.size {
		br.Reset(r.src)
		r.br = br
		return
	}
	r.br = bufio.NewReaderSize(r.src, r.size)
}

// Next reads and validates the next header. After a DATA header the caller
// must consume exactly h.Len bytes with ReadData before calling Next again;
// after any other header it must call Payload.
func (r *Reader) Next() (Header, error) {
	if r.pending != 0 {
		return Header{}, fmt.Errorf("frame: Next with %d DATA bytes unread", r.pending)
	}
	woke := false
	if r.idle != nil && r.br != nil && r.br.Buffered() == 0 {
		ready, err := r.probed()
		if err != nil {
			return Header{}, err
		}
		if !ready {
			r.park()
			if err := r.idle(); err != nil {
				return Header{}, err
			}
			woke = true
		}
	}
	for n := 0; ; {
		k, err := io.ReadFull(r.head(), r.hdr[n:])
		n += k
		if !woke || r.settle == nil {
			if err != nil {
				return Header{}, err
			}
			break
		}
		if err := r.settle(err, n == 0); err != nil {
			return Header{}, err
		}
		if n == HeaderLen {
			break
		}
	}
	if r.br == nil {
		r.wake()
	}
	h, err := ParseHeader(r.hdr[:])
	if err != nil {
		return h, err
	}
	if h.Type == TypeData {
		r.pending = h.Len
	}
	return h, nil
}

// Payload reads the payload of a control frame. The slice is valid until
// the next call on r.
//
// It points into the read-ahead buffer (an idle link's Reader holds no
// payload array of its own), unless that buffer is smaller than the
// payload.
func (r *Reader) Payload(h Header) ([]byte, error) {
	if lo, hi, ok := maxLen(h.Type); h.Type == TypeData || !ok || h.Len < lo || h.Len > hi || h.Len > maxControl {
		return nil, fmt.Errorf("%w: Payload(%v, %d)", ErrLength, h.Type, h.Len)
	}
	p, err := r.br.Peek(h.Len)
	if err == bufio.ErrBufferFull {
		p = make([]byte, h.Len)
		if _, err := io.ReadFull(r.br, p); err != nil {
			return nil, truncated(err)
		}
		return p, nil
	}
	if err != nil {
		return nil, truncated(err)
	}
	r.br.Discard(h.Len) // what Peek returned: cannot fail
	return p, nil
}

// ReadData reads up to len(p) bytes of the current DATA payload into p and
// returns how many it read. It reads exactly min(len(p), remaining).
func (r *Reader) ReadData(p []byte) (int, error) {
	if len(p) > r.pending {
		p = p[:r.pending]
	}
	n, err := io.ReadFull(r.br, p)
	r.pending -= n
	return n, truncated(err)
}

// BufferedLen is how many bytes the read-ahead buffer holds: bytes read
// from the source and not yet consumed.
func (r *Reader) BufferedLen() int {
	if r.br == nil {
		return 0
	}
	return r.br.Buffered()
}

// DataTaken records that the caller read n bytes of the current DATA
// payload straight from the source, past the Reader (a link that splices
// payloads to their destination). It is allowed only while nothing is
// buffered: those bytes come first, through ReadData.
func (r *Reader) DataTaken(n int) error {
	if n < 0 || n > r.pending {
		return fmt.Errorf("frame: DataTaken(%d) with %d DATA bytes pending", n, r.pending)
	}
	if b := r.BufferedLen(); b > 0 {
		return fmt.Errorf("frame: DataTaken with %d bytes buffered", b)
	}
	r.pending -= n
	return nil
}

// DataRemaining is the number of bytes of the current DATA payload not yet read.
func (r *Reader) DataRemaining() int { return r.pending }

// ReadPreamble reads Magic and the version byte.
func (r *Reader) ReadPreamble() (byte, error) {
	var b [PreambleLen]byte
	if _, err := io.ReadFull(r.head(), b[:]); err != nil {
		return 0, truncated(err)
	}
	return ParsePreamble(b[:])
}

// truncated turns an EOF in the middle of a frame into io.ErrUnexpectedEOF:
// a link that ends between frames ended cleanly, one that ends inside a
// frame did not.
func truncated(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// Buffered returns a copy of the bytes read from the source and not yet
// consumed: what a caller that takes the source over must pass on first
// (a gateway forwarding a link to another node).
func (r *Reader) Buffered() []byte {
	if r.br == nil || r.br.Buffered() == 0 {
		return nil
	}
	b, _ := r.br.Peek(r.br.Buffered())
	return append([]byte(nil), b...)
}
