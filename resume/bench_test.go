package resume

import (
	"context"
	"io"
	"net"
	"os"
	"strconv"
	"testing"
)

// benchCopy sends n bytes from w to r in 32 KiB writes and waits for r to
// read them all.
func benchCopy(b *testing.B, w io.Writer, r io.Reader, n int) {
	buf := make([]byte, 32<<10)
	done := make(chan error, 1)
	go func() {
		rb := make([]byte, 64<<10)
		got := 0
		for got < n {
			k, err := r.Read(rb)
			got += k
			if err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for sent := 0; sent < n; {
		k, err := w.Write(buf[:min(len(buf), n-sent)])
		if err != nil {
			b.Fatal(err)
		}
		sent += k
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

const benchBytes = 64 << 20

// BenchmarkThroughput compares a resume.Conn pair over loopback TCP with a
// raw loopback TCP connection in the same run.
func BenchmarkThroughput(b *testing.B) {
	b.Run("tcp", func(b *testing.B) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		acc := make(chan net.Conn, 1)
		go func() { c, _ := ln.Accept(); acc <- c }()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		s := <-acc
		defer c.Close()
		defer s.Close()
		b.SetBytes(benchBytes)
		b.ResetTimer()
		for range b.N {
			benchCopy(b, c, s, benchBytes)
		}
	})
	b.Run("resume", func(b *testing.B) {
		cfg := DefaultConfig()
		if v := os.Getenv("BENCH_BUF"); v != "" {
			cfg.BufferSize, _ = strconv.Atoi(v)
		}
		e := tcpEnv(b, serverConfig(cfg), nil)
		defer e.stop()
		c, err := Dial(context.Background(), e.dial, "bench", cfg)
		if err != nil {
			b.Fatal(err)
		}
		s, err := e.srv.Accept()
		if err != nil {
			b.Fatal(err)
		}
		defer c.Reset(0, "")
		b.SetBytes(benchBytes)
		b.ResetTimer()
		for range b.N {
			benchCopy(b, c, s, benchBytes)
		}
	})
}
