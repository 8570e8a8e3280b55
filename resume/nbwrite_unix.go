//go:build unix

package resume

import (
	"io"
	"syscall"
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
