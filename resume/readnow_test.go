//go:build linux

package resume

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// readNowEventually calls ReadNow until the socket has something (or 5 s).
func readNowEventually(t *testing.T, c *net.TCPConn, p []byte) (int, error) {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		n, ready, err := readNow(c, rc, p)
		if ready {
			return n, err
		}
		if n != 0 || err != nil {
			t.Fatalf("not ready, yet read %d, %v", n, err)
		}
		if time.Now().After(deadline) {
			t.Fatal("socket never became readable")
		}
		time.Sleep(time.Millisecond)
	}
}

func rawConn(t *testing.T, c *net.TCPConn) syscall.RawConn {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// readNow fails the way a Read would: data, then EOF after a FIN, an
// ECONNRESET after an RST, the deadline, a closed socket.
func TestReadNow(t *testing.T) {
	a, b := tcpPair(t)
	defer a.Close()
	p := make([]byte, 16)
	if n, ready, err := readNow(a, rawConn(t, a), p); ready || n != 0 || err != nil {
		t.Fatalf("empty socket: %d, ready %v, %v; want 0, false, nil", n, ready, err)
	}
	b.Write([]byte("abc"))
	if n, err := readNowEventually(t, a, p); n != 3 || err != nil || string(p[:3]) != "abc" {
		t.Fatalf("read %d %q, %v; want 3 \"abc\"", n, p[:n], err)
	}
	b.CloseWrite()
	if n, err := readNowEventually(t, a, p); n != 0 || err != io.EOF {
		t.Fatalf("after FIN: %d, %v; want 0, EOF", n, err)
	}
	b.Close()

	a2, b2 := tcpPair(t)
	b2.SetLinger(0)
	b2.Close()
	if _, err := readNowEventually(t, a2, p); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("after RST: %v; want ECONNRESET", err)
	}
	if _, err := readNowEventually(t, a2, p); err != io.EOF {
		// After the reset the socket reads EOF, as a Read would.
		t.Fatalf("read after the reset: %v; want EOF", err)
	}
	a2.Close()

	a3, b3 := tcpPair(t)
	defer b3.Close()
	rc3 := rawConn(t, a3)
	a3.SetReadDeadline(time.Unix(1, 0))
	if _, ready, err := readNow(a3, rc3, p); !ready || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("past deadline: ready %v, %v; want true, deadline exceeded", ready, err)
	}
	a3.Close()
	if _, ready, err := readNow(a3, rc3, p); !ready || !errors.Is(err, net.ErrClosed) {
		t.Fatalf("closed: ready %v, %v; want true, net.ErrClosed", ready, err)
	}
}

// A loan that took a chunk of its own and filled nothing gives it back.
func TestCommitNothingGivesBackChunk(t *testing.T) {
	var b ReplayBuffer
	b.Tail()
	b.Commit(0)
	if len(b.chunks) != 0 {
		t.Fatalf("%d chunks after an empty loan on an empty buffer", len(b.chunks))
	}
	data := stream(3, chunkSize)
	b.Write(data)
	b.Tail() // a second chunk
	b.Commit(0)
	if len(b.chunks) != 1 {
		t.Fatalf("%d chunks holding exactly one chunk's bytes, want 1", len(b.chunks))
	}
	got := make([]byte, chunkSize)
	if n := b.Read(got); n != chunkSize || !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes back, equal %v", n, bytes.Equal(got, data))
	}
	b.Write([]byte("x"))
	b.Tail()
	b.Commit(0) // the chunk holds a byte: it stays
	if len(b.chunks) != 1 || b.Len() != 1 {
		t.Fatalf("%d chunks, %d bytes after an empty loan in a used chunk; want 1, 1", len(b.chunks), b.Len())
	}
}

// ReadFrom a TCP socket delivers every byte, and while it waits for the
// application between bursts (each a whole number of chunks, so the last
// read of each fills its chunk), the session holds no send chunk once the
// peer has acknowledged everything.
func TestReadFromSocketIdleHoldsNoChunk(t *testing.T) {
	cfg := DefaultConfig()
	e := tcpEnv(t, serverConfig(cfg), nil)
	defer e.stop()
	c, s := e.pair(cfg)
	defer c.Close()
	defer s.Close()
	src, app := tcpPair(t)
	defer src.Close()
	defer app.Close()
	done := make(chan error, 1)
	go func() {
		_, err := c.ReadFrom(src)
		done <- err
	}()
	data := stream(5, 4*chunkSize)
	got := make([]byte, len(data))
	for burst := 0; burst < 3; burst++ {
		if _, err := app.Write(data); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(s, got); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("burst %d: first difference at %d", burst, firstDiff(got, data))
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			c.s.mu.Lock()
			held, chunks := c.s.send.Len(), len(c.s.send.chunks)
			c.s.mu.Unlock()
			if held == 0 && chunks == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("burst %d: idle sender holds %d bytes in %d chunks", burst, held, chunks)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	app.CloseWrite()
	if err := <-done; err != nil {
		t.Fatalf("ReadFrom after the application's FIN: %v", err)
	}
}
