package main

import (
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// sd_notify(3) without libsystemd: one datagram of newline-separated
// assignments to the unixgram socket named by $NOTIFY_SOCKET. The unit
// files in docs/systemd use Type=notify, so systemd waits for READY=1
// before it counts the service started, and NotifyAccess=all, so that the
// process an in-place upgrade starts (a child of the old main process)
// may announce itself with MAINPID.
//
// What lifeline sends and when:
//
//	READY=1                        listeners up and serving (runProxy)
//	RELOADING=1, MONOTONIC_USEC=   SIGHUP: config and certificates being reloaded
//	READY=1                        reload done (whatever its result)
//	RELOADING=1, MONOTONIC_USEC=   SIGUSR2: an upgrade in place begins (old process)
//	MAINPID=<pid>, READY=1         the new process serves (sdNotifyMainPID)
//	READY=1                        or the upgrade failed: the old process serves on
//	STOPPING=1                     SIGTERM/SIGINT: draining
//
// The new process of an upgrade sends MAINPID so that systemd follows it
// instead of the old process, which then exits.

// notifySocketEnv names the socket; tests point it at their own.
const notifySocketEnv = "NOTIFY_SOCKET"

// sdNotify sends state (e.g. "READY=1", or several lines) to systemd. It
// is a no-op, returning nil, when the process was not started by systemd
// with Type=notify ($NOTIFY_SOCKET unset). The environment variable is
// kept, not unset, so that a re-executed binary (an upgrade) can notify
// too.
func sdNotify(state string) error {
	name := os.Getenv(notifySocketEnv)
	if name == "" {
		return nil
	}
	if !strings.HasPrefix(name, "/") && !strings.HasPrefix(name, "@") {
		return fmt.Errorf("sd_notify: %s=%q is neither a path nor an abstract socket (@name)", notifySocketEnv, name)
	}
	// "@name" is in Linux's abstract namespace: the syscall package
	// turns a leading "@" into the NUL that names it.
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer c.Close()
	// A datagram socket whose reader is gone or full must not hold up
	// a drain or a reload.
	c.SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}

// sdNotifyReloading tells systemd a reload began. MONOTONIC_USEC lets a
// Type=notify-reload unit (systemd 253 and later) match it with its
// signal; plain Type=notify ignores it.
func sdNotifyReloading() error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return sdNotify("RELOADING=1")
	}
	return sdNotify(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", ts.Nano()/1000))
}

// sdNotifyMainPID is for the new process of an in-place upgrade, once it
// serves (listeners inherited, sessions taken over): systemd learns that
// the service's main process is now this one, and that it is ready. The
// unit needs NotifyAccess=all for systemd to accept it from a process
// that is not (yet) the main one.
func sdNotifyMainPID() error {
	return sdNotify(fmt.Sprintf("MAINPID=%d\nREADY=1", os.Getpid()))
}
