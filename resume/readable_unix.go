//go:build unix

package resume

import (
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// waitReadable blocks until the socket has data, EOF or an error, without
// reading anything, so the caller takes a buffer only once there is
// something to put in it. It polls rather than peeks: a recv would consume
// a pending ECONNRESET, and the next read would see a plain EOF.
func waitReadable(rc syscall.RawConn) error {
	return rc.Read(pollNow)
}

// readNow reads what the socket c (its RawConn rc) holds now into p,
// without waiting for more: ready is false when it holds nothing (EAGAIN),
// and then nothing was read. It fails as c.Read would (io.EOF, a closed
// socket, a passed deadline). One read(2) where waiting first, then
// reading, takes a poll(2) as well.
func readNow(c *net.TCPConn, rc syscall.RawConn, p []byte) (n int, ready bool, err error) {
	var errno error
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, errno = unix.Read(int(fd), p)
			if errno != unix.EINTR {
				return true
			}
		}
	})
	switch {
	case err != nil: // closed, or past the read deadline
		return 0, true, err
	case errno == unix.EAGAIN:
		return 0, false, nil
	case errno != nil:
		return 0, true, sourceError(c, errno)
	case n == 0 && len(p) > 0:
		return 0, true, io.EOF
	}
	return n, true, nil
}

// sourceError is errno from reading c, as c.Read would report it.
func sourceError(c *net.TCPConn, errno error) error {
	return &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError("read", errno)}
}
