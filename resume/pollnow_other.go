//go:build unix && !linux

package resume

import "golang.org/x/sys/unix"

// pollNow reports whether fd is readable, at EOF or in error now.
func pollNow(fd uintptr) bool {
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(p, 0)
	return err != nil || n > 0
}
