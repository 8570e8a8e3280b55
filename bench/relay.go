package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
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
	"time"

	"github.com/quic-go/quic-go"
)

// RelayMain is the hidden "lifeline bench-relay" command: a plain relay,
// one io.Copy per direction, the baseline the proxies are measured
// against. Between two relays the hop may be TCP (the "relay" baseline),
// crypto/tls ("tls-relay") or one quic-go stream per connection over one
// QUIC connection ("quic-relay"): --in is what it accepts, --out what it
// dials. It logs {"msg":"relay listening","addr":...} on stderr and runs
// until SIGTERM or SIGINT.
func RelayMain(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("lifeline bench-relay", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:0", "`address` to listen on")
	target := fs.String("target", "", "`address` to forward to")
	in := fs.String("in", "tcp", "what it accepts: tcp, tls or quic")
	out := fs.String("out", "tcp", "what it dials: tcp, tls or quic")
	cert := fs.String("tls-cert", "", "certificate `file` (PEM) for tls or quic")
	key := fs.String("tls-key", "", "key `file` (PEM)")
	ca := fs.String("tls-ca", "", "CA `file` (PEM) the peer's certificate must chain to")
	streams := fs.Int64("quic-streams", quicRelayStreams, "streams one QUIC connection may hold open (--in quic)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *target == "" || fs.NArg() > 0 {
		return errors.New("usage: lifeline bench-relay --listen ADDR --target ADDR [--in tcp|tls|quic] [--out tcp|tls|quic] [--tls-cert F --tls-key F --tls-ca F]")
	}
	for _, t := range []string{*in, *out} {
		if t != "tcp" && t != "tls" && t != "quic" {
			return fmt.Errorf("bench-relay: unknown transport %q (want tcp, tls or quic)", t)
		}
	}
	var tc *relayTLS
	if *in != "tcp" || *out != "tcp" {
		var err error
		if tc, err = loadRelayTLS(*cert, *key, *ca); err != nil {
			return err
		}
	}
	dial, closeDial, err := relayDialer(*out, *target, tc)
	if err != nil {
		return err
	}
	defer closeDial()

	rl := &relayConns{conns: map[*halfConn]struct{}{}}
	var addr string
	var closeLn func()
	var serve func()
	switch *in {
	case "quic":
		ln, err := quic.ListenAddr(*listen, tc.server(quicRelayALPN), quicRelayConfig(true, *streams))
		if err != nil {
			return err
		}
		addr, closeLn = ln.Addr().String(), func() { ln.Close() }
		serve = func() { rl.serveQUIC(ln, dial) }
	default:
		var ln net.Listener
		if *in == "tls" {
			ln, err = tls.Listen("tcp", *listen, tc.server("bench-relay"))
		} else {
			ln, err = net.Listen("tcp", *listen)
		}
		if err != nil {
			return err
		}
		addr, closeLn = ln.Addr().String(), func() { ln.Close() }
		serve = func() { rl.serveStream(ln, dial) }
	}
	line, _ := json.Marshal(map[string]string{"level": "INFO", "msg": "relay listening", "addr": addr, "target": *target, "in": *in, "out": *out})
	fmt.Fprintf(stderr, "%s\n", line)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	go func() { <-sigs; closeLn() }()
	serve()
	rl.closeAll()
	return nil
}

// quicRelayStreams is the quic-relay's stream limit per connection, as
// lifeline's QUIC gateway's default (transport.DefaultQUICMaxIncomingStreams).
const quicRelayStreams = 4096

const quicRelayALPN = "lifeline-bench-relay"

// quicRelayConfig is quic-go's configuration for the quic-relay, with
// lifeline-quic's timers (transport.DefaultQUICConfig): 10 s idle
// timeout, 2 s keep-alive on the dialing side, 5 s handshake timeout.
func quicRelayConfig(server bool, streams int64) *quic.Config {
	c := &quic.Config{HandshakeIdleTimeout: 5 * time.Second, MaxIdleTimeout: 10 * time.Second,
		MaxIncomingUniStreams: -1, MaxIncomingStreams: -1}
	if server {
		c.MaxIncomingStreams = streams
	} else {
		c.KeepAlivePeriod = 2 * time.Second
	}
	return c
}

// relayTLS is the certificate material of a tls or quic hop: mutual TLS
// 1.3 with the bench's throwaway CA, as lifeline-tls and lifeline-quic.
type relayTLS struct {
	cert tls.Certificate
	pool *x509.CertPool
}

func loadRelayTLS(certFile, keyFile, caFile string) (*relayTLS, error) {
	if certFile == "" || keyFile == "" || caFile == "" {
		return nil, errors.New("bench-relay: tls and quic need --tls-cert, --tls-key and --tls-ca")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("bench-relay: no certificate in %s", caFile)
	}
	return &relayTLS{cert: cert, pool: pool}, nil
}

func (t *relayTLS) server(alpn string) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{t.cert},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: t.pool, NextProtos: []string{alpn}}
}

func (t *relayTLS) client(alpn string) *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{t.cert},
		RootCAs: t.pool, NextProtos: []string{alpn}}
}

// halfConn is one end of a relayed connection. rw is the connection
// itself (a *net.TCPConn, so that io.Copy between two of them splices).
type halfConn struct {
	rw         io.ReadWriter
	closeWrite func() error // FIN after what was written
	close      func()       // release, both directions done
	abort      func()       // an error: reset
}

func tcpHalf(c net.Conn) *halfConn {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
		return &halfConn{rw: tc, closeWrite: tc.CloseWrite, close: func() { tc.Close() }, abort: func() { tc.Close() }}
	}
	tc := c.(*tls.Conn)
	tc.NetConn().(*net.TCPConn).SetNoDelay(true)
	return &halfConn{rw: tc, closeWrite: tc.CloseWrite, close: func() { tc.Close() }, abort: func() { tc.Close() }}
}

func quicHalf(s *quic.Stream) *halfConn {
	return &halfConn{rw: s, closeWrite: s.Close,
		// After the peer's FIN and ours nothing is left to release; a
		// CancelWrite now could drop our FIN before it is acknowledged.
		close: func() { s.CancelRead(0) },
		abort: func() { s.CancelRead(1); s.CancelWrite(1) }}
}

// relayDialer returns how the relay reaches its target.
func relayDialer(out, target string, tc *relayTLS) (func() (*halfConn, error), func(), error) {
	switch out {
	case "tcp":
		return func() (*halfConn, error) {
			c, err := net.DialTimeout("tcp", target, 10*time.Second)
			if err != nil {
				return nil, err
			}
			return tcpHalf(c), nil
		}, func() {}, nil
	case "tls":
		d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: tc.client("bench-relay")}
		return func() (*halfConn, error) {
			c, err := d.Dial("tcp", target)
			if err != nil {
				return nil, err
			}
			return tcpHalf(c), nil
		}, func() {}, nil
	}
	// quic: one connection, dialed at the first need and again when it
	// died; a stream per relayed connection, opened with a one-byte
	// header so that the peer sees it at once.
	var mu sync.Mutex
	var conn *quic.Conn
	ctx, cancel := context.WithCancel(context.Background())
	get := func() (*quic.Conn, error) {
		mu.Lock()
		defer mu.Unlock()
		if conn != nil && conn.Context().Err() == nil {
			return conn, nil
		}
		c, err := quic.DialAddr(ctx, target, tc.client(quicRelayALPN), quicRelayConfig(false, 0))
		if err != nil {
			return nil, err
		}
		conn = c
		return c, nil
	}
	dial := func() (*halfConn, error) {
		c, err := get()
		if err != nil {
			return nil, err
		}
		sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
		defer scancel()
		s, err := c.OpenStreamSync(sctx)
		if err != nil {
			return nil, err
		}
		if _, err := s.Write([]byte{0}); err != nil {
			s.CancelWrite(1)
			return nil, err
		}
		return quicHalf(s), nil
	}
	closeAll := func() {
		cancel()
		mu.Lock()
		if conn != nil {
			conn.CloseWithError(0, "")
		}
		mu.Unlock()
	}
	// Dial the connection now, so that the first relayed connection does
	// not wait for the handshake; a failure is retried at the first need.
	get()
	return dial, closeAll, nil
}

// relayConns tracks the relayed connections so that they can be closed
// at exit.
type relayConns struct {
	mu    sync.Mutex
	conns map[*halfConn]struct{}
	quics []*quic.Conn // accepted QUIC connections
	wg    sync.WaitGroup
}

func (rl *relayConns) serveStream(ln net.Listener, dial func() (*halfConn, error)) {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
			// Out of descriptors: wait for some to be freed, as net/http
			// does, rather than stop serving.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if err != nil {
			return
		}
		rl.wg.Add(1)
		go func() {
			defer rl.wg.Done()
			rl.relay(tcpHalf(c), dial)
		}()
	}
}

func (rl *relayConns) serveQUIC(ln *quic.Listener, dial func() (*halfConn, error)) {
	for {
		qc, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		rl.mu.Lock()
		rl.quics = append(rl.quics, qc)
		rl.mu.Unlock()
		rl.wg.Add(1)
		go func() {
			defer rl.wg.Done()
			for {
				s, err := qc.AcceptStream(context.Background())
				if err != nil {
					return
				}
				rl.wg.Add(1)
				go func() {
					defer rl.wg.Done()
					var hdr [1]byte
					if _, err := io.ReadFull(s, hdr[:]); err != nil {
						s.CancelRead(1)
						s.CancelWrite(1)
						return
					}
					rl.relay(quicHalf(s), dial)
				}()
			}
		}()
	}
}

func (rl *relayConns) relay(a *halfConn, dial func() (*halfConn, error)) {
	b, err := dial()
	if err != nil {
		a.abort()
		return
	}
	rl.mu.Lock()
	rl.conns[a], rl.conns[b] = struct{}{}, struct{}{}
	rl.mu.Unlock()
	relayPair(a, b)
	rl.mu.Lock()
	delete(rl.conns, a)
	delete(rl.conns, b)
	rl.mu.Unlock()
}

func (rl *relayConns) closeAll() {
	rl.mu.Lock()
	for c := range rl.conns {
		c.abort()
	}
	for _, qc := range rl.quics {
		qc.CloseWithError(0, "")
	}
	rl.mu.Unlock()
	rl.wg.Wait()
}

// relayPair copies both ways with io.Copy, passing FINs on, until both
// directions end.
func relayPair(a, b *halfConn) {
	var wg sync.WaitGroup
	wg.Add(2)
	var once sync.Once
	failed := false
	cp := func(dst, src *halfConn) {
		defer wg.Done()
		if _, err := io.Copy(dst.rw, src.rw); err != nil {
			once.Do(func() { failed = true; a.abort(); b.abort() })
			return
		}
		dst.closeWrite()
	}
	go cp(a, b)
	go cp(b, a)
	wg.Wait()
	if !failed {
		a.close()
		b.close()
	}
}
