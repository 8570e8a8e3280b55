//go:build unix

package proxy

import (
	"net"

	"golang.org/x/sys/unix"
)

// appGone reports whether the application has closed or reset c without
// sending a byte: a peek sees EOF or an error. Data waiting (a peek of one
// byte succeeds) or nothing yet (EAGAIN) means it is still there; the
// peek consumes nothing.
func appGone(c *net.TCPConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	gone := false
	rc.Control(func(fd uintptr) {
		var b [1]byte
		for {
			n, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
			if err == unix.EINTR {
				continue
			}
			gone = err == nil && n == 0 || err != nil && err != unix.EAGAIN
			return
		}
	})
	return gone
}
