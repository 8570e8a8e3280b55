package resume

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// pollNow reports whether fd is readable, at EOF or in error now. A
// ppoll with a zero timeout cannot block, so it is made as a raw system
// call. Through syscall.Syscall each one told the runtime it might block,
// and on a process that had gone quiet between two messages that woke
// the sysmon thread from its idle sleep: two futex calls and a few
// nanosleeps per message, most of the system calls a small request and
// its answer cost a proxy (strace -c: 3.5 futex and 6 nanosleep per
// 64-byte exchange, against 0.05 and 0.15 for a Go splice relay).
func pollNow(fd uintptr) bool {
	p := unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
	var ts unix.Timespec
	for {
		n, _, errno := unix.RawSyscall6(unix.SYS_PPOLL, uintptr(unsafe.Pointer(&p)), 1, uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		return errno != 0 || n > 0
	}
}

// epollNow is epoll_wait with a zero timeout, raw for the same reason.
func epollNow(epfd int, evs []unix.EpollEvent) (int, error) {
	n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(epfd), uintptr(unsafe.Pointer(&evs[0])), uintptr(len(evs)), 0, 0, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}
