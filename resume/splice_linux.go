//go:build linux

package resume

import (
	"fmt"
	"net"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// spliceRx: a tcp link's reader may move DATA payloads to a TCP sink with
// splice(2) through a pipe, without copying them through user space
// (link.spliceData).
const spliceRx = true

// rxPipe is a pipe a link's reader splices one payload step through. It
// is empty whenever it is not in a reader's hands.
type rxPipe struct {
	r, w int
	// pages a send buffer pipe counts in pipePool.txPages (0 for the
	// receive pipes, which keep the default size).
	pages int
}

// maxIdlePipes bounds the pipes kept for reuse. Only readers in the middle
// of a step hold one, so an idle session holds none; the pool keeps a few
// so that busy links do not open and close a pipe per frame.
const maxIdlePipes = 16

var pipePool struct {
	mu   sync.Mutex
	free []*rxPipe
	open int // pipes open, in the pool or in use (tests)
	// txPages is the capacity in pages of the send buffer pipes open
	// (getTxPipe), pooled or in use.
	txPages int
}

func getPipe() (*rxPipe, error) {
	pipePool.mu.Lock()
	defer pipePool.mu.Unlock()
	if n := len(pipePool.free); n > 0 {
		p := pipePool.free[n-1]
		pipePool.free = pipePool.free[:n-1]
		return p, nil
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("%w: %w", errNoPipe, err)
	}
	pipePool.open++
	return &rxPipe{r: fds[0], w: fds[1]}, nil
}

// putPipe gives back an empty pipe (one that may hold bytes must be
// closed instead: the next user would deliver them).
func putPipe(p *rxPipe) {
	pipePool.mu.Lock()
	defer pipePool.mu.Unlock()
	if len(pipePool.free) < maxIdlePipes {
		pipePool.free = append(pipePool.free, p)
		return
	}
	p.closeLocked()
}

func (p *rxPipe) close() {
	pipePool.mu.Lock()
	defer pipePool.mu.Unlock()
	p.closeLocked()
}

func (p *rxPipe) closeLocked() {
	unix.Close(p.r)
	unix.Close(p.w)
	pipePool.open--
	pipePool.txPages -= p.pages
}

// closeIdlePipes closes the pooled pipes and returns how many pipes are
// still open (in use). For tests that count descriptors.
func closeIdlePipes() int {
	pipePool.mu.Lock()
	defer pipePool.mu.Unlock()
	for _, p := range pipePool.free {
		p.closeLocked()
	}
	pipePool.free = nil
	txPool.mu.Lock()
	for _, p := range txPool.free {
		p.closeLocked()
	}
	txPool.free = nil
	txPool.mu.Unlock()
	return pipePool.open
}

// spliceIn moves up to n bytes from the socket (what, for errors) into a pipe, waiting in
// the poller (with the socket's read deadline) until some are there, and
// returns the pipe holding them. 0 bytes and no error is the peer's FIN
// (and no pipe). The pipe is taken only once there are bytes to move: a
// link stalled in the middle of a frame (a blackholed path, until its
// liveness timeout) holds no descriptors for it.
func spliceIn(rc syscall.RawConn, n int, what string, nowait bool) (*rxPipe, int, error) {
	var p *rxPipe
	var k int64
	var err error
	if rerr := rc.Read(func(fd uintptr) bool {
		if p == nil {
			if p, err = getPipe(); err != nil {
				return true
			}
		}
		for {
			k, err = splice(int(fd), p.w, n)
			if err != unix.EINTR {
				break
			}
		}
		if err == unix.EAGAIN && nowait {
			putPipe(p)
			p = nil
			err = errSourceEmpty
			return true
		}
		if err == unix.EAGAIN {
			// Nothing to read yet (the pipe is empty, so it is not
			// full): wait in the poller, without the pipe.
			putPipe(p)
			p = nil
			return false
		}
		return true
	}); rerr != nil {
		err = rerr
	} else if err != nil && p != nil && err != errSourceEmpty {
		err = fmt.Errorf("resume: splice from %s: %w", what, err)
	}
	if err != nil || k == 0 {
		if p != nil {
			putPipe(p) // empty: the splice moved nothing
		}
		return nil, 0, err
	}
	return p, int(k), nil
}

// spliceOut moves up to n bytes from the pipe to the socket without
// waiting: what the socket cannot take now stays in the pipe. An error
// (the application reset its connection) moves nothing; the pump that
// writes what is left hears it again and reports it.
func spliceOut(rc syscall.RawConn, p *rxPipe, n int) int {
	var m int64
	var err error
	if rerr := rc.Write(func(fd uintptr) bool {
		for {
			m, err = splice(p.r, int(fd), n)
			if err != unix.EINTR {
				return true // done either way: we never wait here
			}
		}
	}); rerr != nil || err != nil {
		return 0
	}
	return int(m)
}

// readPipe reads len(b) bytes that the pipe holds.
func readPipe(p *rxPipe, b []byte) error {
	for len(b) > 0 {
		k, err := unix.Read(p.r, b)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return fmt.Errorf("resume: read from splice pipe: %w", err)
		case k == 0:
			return fmt.Errorf("resume: splice pipe ended with %d bytes unread", len(b))
		}
		b = b[k:]
	}
	return nil
}

// spliceConn is the socket under c for splicing, or nil: TCP sockets
// only (what proxy joins; TLS and QUIC links keep the copy path).
func spliceConn(c any) syscall.RawConn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// splice moves up to n bytes from rfd to wfd without waiting (the count is
// an int or an int64, depending on the architecture).
func splice(rfd, wfd, n int) (int64, error) {
	m, err := unix.Splice(rfd, nil, wfd, nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
	return int64(m), err
}
