package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startSleeper runs sleep under the given executable name and returns its
// pid; it is killed at the end of the test.
func startSleeper(t *testing.T, name string) int {
	t.Helper()
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep binary")
	}
	bin := filepath.Join(t.TempDir(), name)
	b, err := os.ReadFile(sleep)
	if err != nil {
		t.Skip(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "60")
	if err := cmd.Start(); err != nil {
		t.Skip(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd.Process.Pid
}

// deadPID is the pid of a process that has exited.
func deadPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skip(err)
	}
	return cmd.Process.Pid
}

func TestCheckPIDFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "lifeline.pid")
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if stale, err := checkPIDFile(path); stale != "" || err != nil {
		t.Errorf("no file: %q, %v", stale, err)
	}
	for name, content := range map[string]string{
		"garbage":     "not a pid\n",
		"empty":       "",
		"dead":        fmt.Sprintf("%d\n", deadPID(t)),
		"not running": "4194304999\n",
		"reused":      strconv.Itoa(startSleeper(t, "not-ours")),
	} {
		write(content)
		stale, err := checkPIDFile(path)
		if err != nil || stale == "" {
			t.Errorf("%s (%q): stale=%q err=%v, want stale", name, content, stale, err)
		}
	}
	// Our own pid (an earlier life of a container) and our parent's (an
	// upgrade's old process) are no reason to refuse.
	for _, pid := range []int{os.Getpid(), os.Getppid()} {
		write(strconv.Itoa(pid))
		if _, err := checkPIDFile(path); err != nil {
			t.Errorf("pid %d: %v", pid, err)
		}
	}
	live := startSleeper(t, "lifeline")
	write(fmt.Sprintf("%d\n", live))
	_, err := checkPIDFile(path)
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("already running as process %d", live)) {
		t.Errorf("a live lifeline: %v", err)
	}
}

func TestWriteRemovePIDFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "lifeline.pid")
	if err := os.WriteFile(path, []byte("123\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writePIDFile(path); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if string(b) != fmt.Sprintf("%d\n", os.Getpid()) {
		t.Errorf("pid file holds %q", b)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("pid file mode: %v, %v", fi.Mode(), err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("temporary files left: %v", ents)
	}
	if err := removePIDFile(path); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("pid file still there: %v", err)
	}
	if err := removePIDFile(path); err != nil {
		t.Errorf("removing a missing pid file: %v", err)
	}
	// After an upgrade the file names the new process: the old one
	// leaves it.
	os.WriteFile(path, []byte("4242\n"), 0o644)
	if err := removePIDFile(path); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); string(b) != "4242\n" {
		t.Errorf("another process's pid file was changed: %q", b)
	}
	if err := writePIDFile(filepath.Join(dir, "missing", "x.pid")); err == nil {
		t.Error("a pid file in a missing directory: no error")
	}
}

// The real binary: the pid file appears once the gateway serves, a second
// gateway on it refuses to start with a clear error, SIGTERM removes it,
// and a stale one is overwritten.
func TestPIDFileBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	path := filepath.Join(t.TempDir(), "gw.pid")
	os.WriteFile(path, []byte(fmt.Sprintf("%d\n", deadPID(t))), 0o644)
	up := freeAddr(t)
	gw := startProc(t, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", up, "--pid-file", path)
	gw.waitLog("gateway listening", 30*time.Second)
	if gw.waitLog("pid file is stale; overwriting it", 5*time.Second)["why"] == "" {
		t.Error("stale pid file: no reason logged")
	}
	want := fmt.Sprintf("%d\n", gw.cmd.Process.Pid)
	deadline := time.Now().Add(10 * time.Second)
	for b, _ := os.ReadFile(path); string(b) != want; b, _ = os.ReadFile(path) {
		if time.Now().After(deadline) {
			t.Fatalf("pid file holds %q, want %q", b, want)
		}
		time.Sleep(20 * time.Millisecond)
	}

	second := startProc(t, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", up, "--pid-file", path)
	if code := second.wait(20 * time.Second); code != exitRuntime {
		t.Errorf("second gateway on the same pid file exited %d, want %d", code, exitRuntime)
	}
	if out := second.output(); !strings.Contains(out, fmt.Sprintf("lifeline is already running as process %d", gw.cmd.Process.Pid)) {
		t.Errorf("second gateway's error: %q", out)
	}
	if b, _ := os.ReadFile(path); string(b) != want {
		t.Errorf("the refused gateway changed the pid file: %q", b)
	}

	gw.cmd.Process.Signal(syscall.SIGTERM)
	if code := gw.wait(30 * time.Second); code != 0 {
		t.Errorf("gateway exited %d", code)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("pid file left after exit: %v", err)
	}
}
