package main

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// --pid-file: written once the proxy serves, removed at exit if it still
// names this process. An in-place upgrade (USR2) hands the file on: the
// new process writes its own pid when it takes over (tableflip's PIDFile
// option does it at Ready, atomically), and the old process, exiting
// after it, finds another pid in the file and leaves it alone.

// checkPIDFile refuses to start when path names a live lifeline process:
// two proxies on one pid file would leave a service manager (systemd's
// PIDFile=, an init script's kill) pointing at the wrong one. A file
// naming a dead process, a process that is not lifeline (the pid was
// reused), or holding no pid at all is stale and will be overwritten;
// stale says why, for a log line ("" if there is no file). The parent of
// this process is not counted: during an upgrade the file still names the
// old process, which started this one.
func checkPIDFile(path string) (stale string, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 || pid > math.MaxInt32 {
		// Not a pid_t: kill(2) would read it as a process group.
		return fmt.Sprintf("holds %.20q, not a pid", b), nil
	}
	if pid == os.Getpid() || pid == os.Getppid() {
		// Our own pid: left by an earlier life of a container whose
		// pids start over. Our parent's: an upgrade.
		return "", nil
	}
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return fmt.Sprintf("process %d is gone", pid), nil
	}
	// Alive (or not ours to signal: EPERM). Is it a lifeline?
	name, known := processName(pid)
	if known && !strings.Contains(name, "lifeline") {
		return fmt.Sprintf("process %d is %q, not lifeline (its pid was reused)", pid, name), nil
	}
	return "", fmt.Errorf("pid file %s: lifeline is already running as process %d; stop it first, or give this one another --pid-file", path, pid)
}

// processName is the executable name of pid from /proc (Linux); known is
// false where that cannot be read, and the process then counts as a
// lifeline: refusing to start is the safe mistake.
func processName(pid int) (name string, known bool) {
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err == nil {
		// " (deleted)" follows the name of a binary replaced since it
		// started, as an upgrade does.
		return filepath.Base(strings.TrimSuffix(exe, " (deleted)")), true
	}
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil {
		return strings.TrimSpace(string(comm)), true
	}
	return "", false
}

// writePIDFile writes this process's pid to path atomically: a reader
// (systemd, a script) sees the old content or the new, never a partial
// one. The directory must exist.
func writePIDFile(path string) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp*")
	if err != nil {
		return fmt.Errorf("pid file: %w", err)
	}
	tmp := f.Name()
	_, err = fmt.Fprintf(f, "%d\n", os.Getpid())
	if err == nil {
		err = f.Chmod(0o644)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("pid file: %w", err)
	}
	return nil
}

// removePIDFile removes path if it names this process. After an upgrade
// it names the new process, which owns it from then on.
func removePIDFile(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("pid file: %w", err)
	}
	if strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pid file: %w", err)
	}
	return nil
}
