package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// listenNotify listens on a unixgram socket as systemd does and points
// $NOTIFY_SOCKET at it.
func listenNotify(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv(notifySocketEnv, name)
	return c
}

func readNotify(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 4096)
	n, err := c.Read(b)
	if err != nil {
		t.Fatalf("no notification: %v", err)
	}
	return string(b[:n])
}

func TestSdNotify(t *testing.T) {
	c := listenNotify(t, filepath.Join(t.TempDir(), "notify.sock"))
	if err := sdNotify("READY=1"); err != nil {
		t.Fatal(err)
	}
	if got := readNotify(t, c); got != "READY=1" {
		t.Errorf("got %q, want READY=1", got)
	}
	if err := sdNotifyReloading(); err != nil {
		t.Fatal(err)
	}
	got := readNotify(t, c)
	lines := strings.Split(got, "\n")
	if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") || len(lines[1]) <= len("MONOTONIC_USEC=") {
		t.Errorf("reloading: got %q", got)
	}
	if err := sdNotify("STOPPING=1"); err != nil {
		t.Fatal(err)
	}
	if got := readNotify(t, c); got != "STOPPING=1" {
		t.Errorf("got %q, want STOPPING=1", got)
	}
	if err := sdNotifyMainPID(); err != nil {
		t.Fatal(err)
	}
	if got, want := readNotify(t, c), fmt.Sprintf("MAINPID=%d\nREADY=1", os.Getpid()); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestSdNotifyAbstract(t *testing.T) {
	name := fmt.Sprintf("@lifeline-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	c := listenNotify(t, name)
	if err := sdNotify("READY=1"); err != nil {
		t.Fatal(err)
	}
	if got := readNotify(t, c); got != "READY=1" {
		t.Errorf("got %q, want READY=1", got)
	}
}

func TestSdNotifyOff(t *testing.T) {
	t.Setenv(notifySocketEnv, "")
	if err := sdNotify("READY=1"); err != nil {
		t.Errorf("without NOTIFY_SOCKET: %v, want nil", err)
	}
	t.Setenv(notifySocketEnv, "relative.sock")
	if err := sdNotify("READY=1"); err == nil {
		t.Error("a relative NOTIFY_SOCKET: no error")
	}
	t.Setenv(notifySocketEnv, filepath.Join(t.TempDir(), "nobody-listens"))
	if err := sdNotify("READY=1"); err == nil {
		t.Error("a socket nobody listens on: no error")
	}
}
