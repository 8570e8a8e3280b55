package faultnet_test

import (
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func newRelay(t *testing.T, target string) *faultnet.Relay {
	t.Helper()
	r, err := faultnet.NewRelay("127.0.0.1:0", target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// Echo checks a fixed-size stream and an open-ended one through a relay,
// and counts what it verified.
func TestEchoThroughRelay(t *testing.T) {
	r := newRelay(t, testnet.EchoServer(t))
	var verified atomic.Int64
	if err := (faultnet.Echo{Seed: 1, Size: 1 << 20, Verified: &verified}.Dial(r.Addr())); err != nil {
		t.Fatal(err)
	}
	if verified.Load() != 1<<20 {
		t.Fatalf("verified %d bytes, want %d", verified.Load(), 1<<20)
	}
	stop := make(chan struct{})
	time.AfterFunc(200*time.Millisecond, func() { close(stop) })
	verified.Store(0)
	if err := (faultnet.Echo{Seed: 2, Stop: stop, MaxPause: 2 * time.Millisecond, Verified: &verified}.Dial(r.Addr())); err != nil {
		t.Fatal(err)
	}
	if verified.Load() == 0 {
		t.Fatal("an open-ended stream verified nothing")
	}
	if r.Accepted() != 2 {
		t.Fatalf("relay accepted %d connections, want 2", r.Accepted())
	}
}

// A changed byte is a mismatch, told apart from a failed connection.
func TestEchoFindsMismatch(t *testing.T) {
	up := testnet.TCPServer(t, func(c *net.TCPConn) {
		buf := make([]byte, 1000)
		var off int
		for {
			n, err := c.Read(buf)
			for i := range n {
				if off+i == 5000 {
					buf[i] ^= 1
				}
			}
			off += n
			c.Write(buf[:n])
			if err != nil {
				c.CloseWrite()
				return
			}
		}
	})
	err := faultnet.Echo{Seed: 3, Size: 10000}.Dial(up)
	if !errors.Is(err, faultnet.ErrMismatch) {
		t.Fatalf("Echo through a corrupting service: %v, want ErrMismatch", err)
	}
	t.Log(err)
}

// Hold stops the writer at HoldAt until it closes; Mark fires once MarkAt
// bytes came back.
func TestEchoHoldAndMark(t *testing.T) {
	up := testnet.EchoServer(t)
	hold := make(chan struct{})
	marked := false
	err := faultnet.Echo{Seed: 4, Size: 100000, HoldAt: 50000, Hold: hold, MarkAt: 50000, Mark: func() {
		marked = true
		close(hold)
	}}.Dial(up)
	if err != nil || !marked {
		t.Fatalf("err %v, marked %v", err, marked)
	}
}

// Each mode breaks a connection through the relay as it says.
func TestRelayModes(t *testing.T) {
	up := testnet.TCPServer(t, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	for _, mode := range faultnet.Modes {
		t.Run(mode.String(), func(t *testing.T) {
			r := newRelay(t, up)
			c, err := net.Dial("tcp", r.Addr())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			deadline := time.Now().Add(5 * time.Second)
			for r.Conns() == 0 {
				if time.Now().After(deadline) {
					t.Fatal("the relay never relayed the connection")
				}
				time.Sleep(time.Millisecond)
			}
			if n := r.Break(mode); n != 1 || r.Breaks() != 1 {
				t.Fatalf("Break hit %d connections, %d breaks, want 1 and 1", n, r.Breaks())
			}
			c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			_, err = c.Read(make([]byte, 1))
			switch mode {
			case faultnet.Reset:
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("read after reset: %v", err)
				}
			case faultnet.Close:
				if err != io.EOF {
					t.Fatalf("read after close: %v", err)
				}
			case faultnet.Blackhole:
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("read after blackhole: %v", err)
				}
			}
		})
	}
}

func TestFirstDiff(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{{"abc", "abc", 3}, {"abc", "abd", 2}, {"ab", "abc", 2}, {"", "x", 0}, {"xbc", "abc", 0}} {
		if got := faultnet.FirstDiff([]byte(tc.a), []byte(tc.b)); got != tc.want {
			t.Errorf("FirstDiff(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}
