//go:build unix

package resume

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// waitReadable blocks until the socket has data, EOF or an error, without
// reading anything, so the caller takes a buffer only once there is
// something to put in it. It polls rather than peeks: a recv would consume
// a pending ECONNRESET, and the next read would see a plain EOF.
func waitReadable(rc syscall.RawConn) error {
	return rc.Read(func(fd uintptr) bool {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(p, 0)
		return err != nil || n > 0
	})
}
