package bench

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
)

// RelayMain is the hidden "lifeline bench-relay" command: a plain TCP
// relay, one io.Copy per direction, the baseline the proxies are measured
// against. It logs {"msg":"relay listening","addr":...} on stderr and runs
// until SIGTERM or SIGINT.
func RelayMain(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("lifeline bench-relay", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:0", "`address` to listen on")
	target := fs.String("target", "", "`address` to forward to")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *target == "" || fs.NArg() > 0 {
		return errors.New("usage: lifeline bench-relay --listen ADDR --target ADDR")
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	line, _ := json.Marshal(map[string]string{"level": "INFO", "msg": "relay listening", "addr": ln.Addr().String(), "target": *target})
	fmt.Fprintf(stderr, "%s\n", line)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	go func() { <-sigs; ln.Close() }()

	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	var wg sync.WaitGroup
	for {
		c, err := ln.Accept()
		if err != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			up, err := net.Dial("tcp", *target)
			if err != nil {
				c.Close()
				return
			}
			mu.Lock()
			conns[c], conns[up] = struct{}{}, struct{}{}
			mu.Unlock()
			relayPair(c.(*net.TCPConn), up.(*net.TCPConn))
			mu.Lock()
			delete(conns, c)
			delete(conns, up)
			mu.Unlock()
		}()
	}
	mu.Lock()
	for c := range conns {
		c.Close()
	}
	mu.Unlock()
	wg.Wait()
	return nil
}

// relayPair copies both ways with io.Copy, passing FINs on, until both
// directions end.
func relayPair(a, b *net.TCPConn) {
	a.SetNoDelay(true)
	b.SetNoDelay(true)
	var wg sync.WaitGroup
	wg.Add(2)
	cp := func(dst, src *net.TCPConn) {
		defer wg.Done()
		if _, err := io.Copy(dst, src); err != nil {
			a.Close()
			b.Close()
			return
		}
		dst.CloseWrite()
	}
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	a.Close()
	b.Close()
}
