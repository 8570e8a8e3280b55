//go:build unix

package resume

import (
	"io"
	"syscall"

	"golang.org/x/sys/unix"
)

// nonBlocking returns a writer that writes to the socket once, without
// waiting for room: less than asked is errWouldBlock.
func nonBlocking(rc syscall.RawConn) io.Writer { return nonBlockingWriter{rc} }

type nonBlockingWriter struct{ rc syscall.RawConn }

func (w nonBlockingWriter) Write(p []byte) (int, error) {
	var n int
	var err error
	if rerr := w.rc.Write(func(fd uintptr) bool {
		for {
			n, err = syscall.Write(int(fd), p)
			if err != syscall.EINTR {
				return true // done either way: we never wait here
			}
		}
	}); rerr != nil {
		return 0, rerr
	}
	switch {
	case err == syscall.EAGAIN:
		return 0, errWouldBlock
	case err != nil:
		return 0, err
	case n < len(p):
		return n, errWouldBlock
	}
	return n, nil
}

// inlineWrites: a goroutine that fills the replay buffer may write to the
// link itself (sendInline).
const inlineWrites = true

// writevNonBlocking writes *segs to the socket with one writev(2), without
// waiting for room, and leaves in *segs what it did not write: nil when
// all of it went, errWouldBlock when some is left, or the error.
func writevNonBlocking(rc syscall.RawConn, segs *[][]byte) error {
	var n int
	var err error
	if rerr := rc.Write(func(fd uintptr) bool {
		for {
			n, err = unix.Writev(int(fd), *segs)
			if err != unix.EINTR {
				return true // done either way: we never wait here
			}
		}
	}); rerr != nil {
		return rerr
	}
	if err == nil && n == total(*segs) {
		return nil // *segs as it was: the writer reuses its array
	}
	for n > 0 && len(*segs) > 0 {
		b := (*segs)[0]
		if n < len(b) {
			(*segs)[0] = b[n:]
			break
		}
		n -= len(b)
		*segs = (*segs)[1:]
	}
	switch {
	case err == unix.EAGAIN:
		return errWouldBlock
	case err != nil:
		return err
	case len(*segs) > 0:
		return errWouldBlock
	}
	return nil
}

func total(segs [][]byte) int {
	n := 0
	for _, b := range segs {
		n += len(b)
	}
	return n
}
