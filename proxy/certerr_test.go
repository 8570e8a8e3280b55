package proxy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/faultnet"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// logSink collects JSON log lines.
type logSink struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logSink) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logSink) logger() *slog.Logger {
	return slog.New(slog.NewJSONHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// lines returns the lines whose msg is msg.
func (l *logSink) lines(msg string) []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(l.buf.Bytes()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

const certFailedMsg = "gateway certificate verification failed; no link to this gateway until it is fixed"

// checkCertLine checks the certificate failure line: ERROR, the gateway's
// actual fingerprint, and what to do (the pin, or the CA flag).
func checkCertLine(t *testing.T, m map[string]any, fp string) {
	t.Helper()
	if m["level"] != "ERROR" || m["gateway_sha256"] != fp {
		t.Fatalf("certificate failure line %v: want ERROR with gateway_sha256 %s", m, fp)
	}
	fix, _ := m["fix"].(string)
	if !strings.Contains(fix, "--tls-pin "+fp) || !strings.Contains(fix, "--tls-ca") {
		t.Fatalf("fix %q lacks --tls-pin %s or --tls-ca", fix, fp)
	}
}

// A new session whose gateway's certificate fails verification (here: a
// wrong pin) is not retried for the reconnect timeout: the application is
// reset at once, and the first failure is logged at once with the
// gateway's actual fingerprint; repeats within a minute are not logged
// again (issue 8, item 8).
func TestCertFailureResetsNewSessionAtOnce(t *testing.T) {
	for _, name := range []string{"tls", "quic"} {
		t.Run(name, func(t *testing.T) {
			gwCert, err := transport.SelfSignedCert()
			if err != nil {
				t.Fatal(err)
			}
			other, err := transport.SelfSignedCert()
			if err != nil {
				t.Fatal(err)
			}
			fp := transport.CertFingerprint(gwCert.Leaf.Raw)
			sink := &logSink{}
			gw, err := NewGateway(GatewayConfig{Routes: []Route{{Name: "default", Upstream: testnet.EchoServer(t)}},
				Server: defaultServerForTest(), Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			defer gw.Close()
			ll, err := transport.Listen(transport.Config{Name: name, Addr: "127.0.0.1:0", TLS: transport.ServerTLS(gwCert)})
			if err != nil {
				t.Fatal(err)
			}
			go gw.Serve(ll)
			d, err := transport.NewDialer(transport.Config{Name: name, Addr: ll.Addr().String(), TLS: transport.PinnedTLS(transport.CertFingerprint(other.Leaf.Raw), "")})
			if err != nil {
				t.Fatal(err)
			}
			cl := NewClient(ClientConfig{Logger: sink.logger()})
			defer cl.Close()
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			cfg := fastConfig() // ReconnectTimeout 20 s
			go cl.Serve(ln, ClientRoute{Route: "default", Dialer: d, Session: cfg, Gateway: ll.Addr().String()})

			for i := range 3 {
				start := time.Now()
				c, err := net.Dial("tcp", ln.Addr().String())
				if err == nil {
					c.Write([]byte("hello"))
					testnet.ExpectReset(t, c, cfg.ReconnectTimeout/2)
					c.Close()
				} else if !errors.Is(err, syscall.ECONNRESET) {
					t.Fatal(err)
				}
				if d := time.Since(start); d > 5*time.Second {
					t.Fatalf("connection %d reset after %v: a certificate failure was retried (reconnect timeout %v)", i, d, cfg.ReconnectTimeout)
				}
				lines := sink.lines(certFailedMsg)
				if len(lines) != 1 {
					t.Fatalf("after %d failures: %d certificate failure lines, want 1 (at once, then rate-limited)", i+1, len(lines))
				}
				checkCertLine(t, lines[0], fp)
			}
		})
	}
}

// A live session whose redial meets a certificate that fails verification
// (the gateway's certificate was replaced by one the client's pin does
// not match) logs it at the first failure, not after the reconnect
// timeout, and only once; the session keeps trying and resumes when the
// right certificate is back (issue 8, item 8).
func TestCertFailureOnRedialLoggedAtOnce(t *testing.T) {
	dir := t.TempDir()
	ca, caKey, _ := testnet.WriteCA(t, dir, "ca")
	certPath, keyPath := testnet.WriteLeaf(t, dir, "gateway", ca, caKey, 2)
	certA, _ := os.ReadFile(certPath)
	keyA, _ := os.ReadFile(keyPath)
	pemFP := func(b []byte) string {
		blk, _ := pem.Decode(b)
		return transport.CertFingerprint(blk.Bytes)
	}
	fpA := pemFP(certA)
	gstore, err := transport.NewCertStore(transport.TLSFiles{Cert: certPath, Key: keyPath})
	if err != nil {
		t.Fatal(err)
	}
	stc, _ := gstore.ServerConfig()
	cstore, err := transport.NewCertStore(transport.TLSFiles{Pin: fpA})
	if err != nil {
		t.Fatal(err)
	}

	sink := &logSink{}
	gw, err := NewGateway(GatewayConfig{Routes: []Route{{Name: "default", Upstream: testnet.EchoServer(t)}},
		Server: defaultServerForTest(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	ll, err := transport.Listen(transport.Config{Name: "tls", Addr: "127.0.0.1:0", TLS: stc})
	if err != nil {
		t.Fatal(err)
	}
	go gw.Serve(ll)
	relay, err := faultnet.NewRelay("127.0.0.1:0", ll.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	d, err := transport.NewDialer(transport.Config{Name: "tls", Addr: relay.Addr(), TLS: cstore.ClientConfig()})
	if err != nil {
		t.Fatal(err)
	}
	cl := NewClient(ClientConfig{Logger: sink.logger()})
	defer cl.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := fastConfig()
	go cl.Serve(ln, ClientRoute{Route: "default", Dialer: d, Session: cfg, Gateway: relay.Addr()})

	c := dialApp(t, ln.Addr().String())
	defer c.Close()
	c.SetDeadline(time.Now().Add(cfg.ReconnectTimeout))
	echo := func(s string) {
		t.Helper()
		c.Write([]byte(s))
		got := make([]byte, len(s))
		if _, err := io.ReadFull(c, got); err != nil || string(got) != s {
			t.Fatalf("echo %q: %q %v", s, got, err)
		}
	}
	echo("before")

	// The gateway now serves certificate B; the link breaks.
	testnet.WriteLeaf(t, dir, "gateway", ca, caKey, 3)
	certB, _ := os.ReadFile(certPath)
	if err := gstore.Reload(); err != nil {
		t.Fatal(err)
	}
	broke := time.Now()
	relay.Reset()
	waitFor(t, "the certificate failure log line", 5*time.Second, func() bool { return len(sink.lines(certFailedMsg)) > 0 })
	t.Logf("logged %v after the link broke (reconnect timeout %v)", time.Since(broke), cfg.ReconnectTimeout)
	checkCertLine(t, sink.lines(certFailedMsg)[0], pemFP(certB))
	// Redials go on (every 100 ms at most) and fail: still one line.
	waitFor(t, "more failed redials", 5*time.Second, func() bool {
		return relay.Accepted() >= 5
	})
	if n := len(sink.lines(certFailedMsg)); n != 1 {
		t.Fatalf("%d certificate failure lines, want 1 (rate-limited)", n)
	}

	// Certificate A is back: the session resumes with no byte lost.
	os.WriteFile(certPath, certA, 0o600)
	os.WriteFile(keyPath, keyA, 0o600)
	if err := gstore.Reload(); err != nil {
		t.Fatal(err)
	}
	echo("after")
	if st := cl.Sessions(); len(st) != 1 || st[0].Resumes < 1 {
		t.Fatalf("want one resumed session: %+v", st)
	}
}

// A client with tls (the default) in front of a gateway that runs tcp (the
// default of older versions) does not retry for the reconnect timeout
// while the application hangs: the application is reset at once, and one
// ERROR line says that both sides need the same --transport.
func TestPlaintextGatewayResetsTLSClientAtOnce(t *testing.T) {
	sink := &logSink{}
	gw, err := NewGateway(GatewayConfig{Routes: []Route{{Name: "default", Upstream: testnet.EchoServer(t)}},
		Server: defaultServerForTest(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	ll, err := transport.Listen(transport.Config{Name: "tcp", Addr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	go gw.Serve(ll)
	d, err := transport.NewDialer(transport.Config{Name: "tls", Addr: ll.Addr().String(), TLS: transport.PinnedTLS(strings.Repeat("ab", 32), "")})
	if err != nil {
		t.Fatal(err)
	}
	cl := NewClient(ClientConfig{Logger: sink.logger()})
	defer cl.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := fastConfig() // ReconnectTimeout 20 s
	go cl.Serve(ln, ClientRoute{Route: "default", Dialer: d, Session: cfg, Gateway: ll.Addr().String()})
	const msg = "the gateway does not speak TLS; no link to this gateway until both sides use the same --transport"
	for i := range 2 {
		start := time.Now()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			c.Write([]byte("hello"))
			testnet.ExpectReset(t, c, cfg.ReconnectTimeout/2)
			c.Close()
		} else if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("connection %d reset after %v (reconnect timeout %v)", i, d, cfg.ReconnectTimeout)
		}
		lines := sink.lines(msg)
		if len(lines) != 1 || lines[0]["level"] != "ERROR" || !strings.Contains(lines[0]["fix"].(string), "--transport") {
			t.Fatalf("after %d failures: %v, want one ERROR line with a --transport fix", i+1, lines)
		}
	}
}
