// Package testnet holds loopback helpers shared by the tests of several
// packages: a TCP service whose connections end with the test, an echo
// service, and the check that a connection was reset. The networks that
// break links are in package faultnet.
package testnet

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TCPServer runs handle for each connection on a loopback listener until
// the test ends; then it closes the listener and every connection and
// waits for the handlers.
func TCPServer(t testing.TB, handle func(*net.TCPConn)) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				handle(c.(*net.TCPConn))
				c.Close()
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// EchoServer echoes every connection, passes the FIN on, then drains.
func EchoServer(t testing.TB) string {
	return TCPServer(t, func(c *net.TCPConn) {
		io.Copy(c, c)
		c.CloseWrite()
		io.Copy(io.Discard, c)
	})
}

// ExpectReset reads from c until an error and fails the test unless it is
// ECONNRESET within the given time.
func ExpectReset(t testing.TB, c net.Conn, within time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 4096)
	for {
		_, err := c.Read(buf)
		if err == nil {
			continue
		}
		if errors.Is(err, syscall.ECONNRESET) {
			return
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("no reset within %v", within)
		}
		t.Fatalf("read ended with %v, want ECONNRESET", err)
	}
}
