package transport

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
)

func TestQUICFingerprintParsing(t *testing.T) {
	fp := strings.Repeat("ab", 32)
	for _, s := range []string{fp, strings.ToUpper(fp), " " + fp + "\n", strings.ToUpper(strings.Join(chunks(fp, 2), ":"))} {
		if _, err := ParseFingerprint(s); err != nil {
			t.Errorf("ParseFingerprint(%q): %v", s, err)
		}
	}
	for _, s := range []string{"", "abc", fp[:62], fp + "ab", strings.Repeat("zz", 32)} {
		if _, err := ParseFingerprint(s); err == nil {
			t.Errorf("ParseFingerprint(%q) accepted it", s)
		}
	}
}

func chunks(s string, n int) []string {
	var out []string
	for len(s) > n {
		out = append(out, s[:n])
		s = s[n:]
	}
	return append(out, s)
}

// Every way this client's verification fails is recognised, with the
// certificate the gateway presented: a pin mismatch, a chain to an
// unknown CA (a CA file's pool, or the system roots).
func TestCertVerifyFailureFindsThePresentedCertificate(t *testing.T) {
	gwCert, err := SelfSignedCert()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	_, _, caPath := testnet.WriteCA(t, dir, "unrelated-ca")
	withCA, err := NewCertStore(TLSFiles{CA: caPath})
	if err != nil {
		t.Fatal(err)
	}
	systemRoots, _ := NewCertStore(TLSFiles{})
	clients := map[string]*tls.Config{
		"pin":          PinnedTLS(strings.Repeat("ab", 32), ""),
		"ca":           withCA.ClientConfig(),
		"system roots": systemRoots.ClientConfig(),
	}
	ll, err := Listen(Config{Name: "tls", Addr: "127.0.0.1:0", TLS: ServerTLS(gwCert)})
	if err != nil {
		t.Fatal(err)
	}
	defer ll.Close()
	go func() {
		for {
			c, err := ll.Accept()
			if err != nil {
				return
			}
			go func() {
				c.SetDeadline(time.Now().Add(5 * time.Second))
				c.Read(make([]byte, 1))
				c.Close()
			}()
		}
	}()
	for name, tc := range clients {
		d, err := NewDialer(Config{Name: "tls", Addr: ll.Addr().String(), TLS: tc})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := d.Dial(ctx)
		cancel()
		if err == nil {
			c.Close()
			t.Fatalf("%s: an unverifiable gateway was accepted", name)
		}
		leaf, ok := CertVerifyFailure(err)
		if !ok || leaf == nil || !bytes.Equal(leaf.Raw, gwCert.Leaf.Raw) {
			t.Errorf("%s: CertVerifyFailure(%v) = %v, %v; want the gateway's certificate", name, err, leaf != nil, ok)
		}
	}
	if _, ok := CertVerifyFailure(errors.New("connection refused")); ok {
		t.Error("a plain dial error taken for a certificate failure")
	}
}

// The tls transport is TLS 1.2 or 1.3 with no ALPN of its own: the
// helpers meant for quic do not force QUIC's ALPN or TLS 1.3 on it. A
// TLS 1.2 link still exports keying material (crypto/tls negotiates the
// extended master secret) for the session engine's binding. quic forces
// both on a clone of the same configs.
func TestTLSTransportVersionsAndALPN(t *testing.T) {
	cert, err := SelfSignedCert()
	if err != nil {
		t.Fatal(err)
	}
	fp := CertFingerprint(cert.Leaf.Raw)
	store, _ := NewCertStore(TLSFiles{Pin: fp})
	for name, c := range map[string]*tls.Config{"ServerTLS": ServerTLS(cert), "PinnedTLS": PinnedTLS(fp, ""), "CertStore.ClientConfig": store.ClientConfig()} {
		if c.MinVersion != tls.VersionTLS12 || c.NextProtos != nil {
			t.Errorf("%s: MinVersion %x, NextProtos %q; want TLS 1.2 and none", name, c.MinVersion, c.NextProtos)
		}
	}
	if q := transportTLS("quic", PinnedTLS(fp, "")); q.MinVersion != tls.VersionTLS13 || len(q.NextProtos) != 1 || q.NextProtos[0] != QUICALPN {
		t.Errorf("quic: MinVersion %x, NextProtos %q; want TLS 1.3 and %s", q.MinVersion, q.NextProtos, QUICALPN)
	}

	ll, err := Listen(Config{Name: "tls", Addr: "127.0.0.1:0", TLS: ServerTLS(cert)})
	if err != nil {
		t.Fatal(err)
	}
	defer ll.Close()
	go func() {
		for {
			c, err := ll.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				io.Copy(c, c)
			}()
		}
	}()
	dial := func(tc *tls.Config) (*tls.Conn, error) {
		d, err := NewDialer(Config{Name: "tls", Addr: ll.Addr().String(), TLS: tc})
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := d.Dial(ctx)
		if err != nil {
			return nil, err
		}
		return c.(*tls.Conn), nil
	}

	c, err := dial(PinnedTLS(fp, ""))
	if err != nil {
		t.Fatal(err)
	}
	if cs := c.ConnectionState(); cs.Version != tls.VersionTLS13 || cs.NegotiatedProtocol != "" {
		t.Errorf("tls link: version %x, ALPN %q; want TLS 1.3 and none", cs.Version, cs.NegotiatedProtocol)
	}
	c.Close()

	tls12 := PinnedTLS(fp, "")
	tls12.MaxVersion = tls.VersionTLS12
	c, err = dial(tls12)
	if err != nil {
		t.Fatalf("a TLS 1.2 client: %v", err)
	}
	cs := c.ConnectionState()
	if cs.Version != tls.VersionTLS12 || cs.NegotiatedProtocol != "" {
		t.Errorf("TLS 1.2 link: version %x, ALPN %q", cs.Version, cs.NegotiatedProtocol)
	}
	if b, err := cs.ExportKeyingMaterial("EXPORTER-lifeline-test", nil, 32); err != nil || len(b) != 32 {
		t.Errorf("TLS 1.2 link exports no keying material (no extended master secret?): %v", err)
	}
	c.Close()

	tls11 := PinnedTLS(fp, "")
	tls11.MinVersion, tls11.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
	if c, err := dial(tls11); err != nil {
		t.Fatalf("a client config capped at TLS 1.1: %v", err)
	} else {
		if v := c.ConnectionState().Version; v < tls.VersionTLS12 {
			t.Errorf("the tls transport dialed with version %x, below TLS 1.2", v)
		}
		c.Close()
	}
	raw, err := tls.Dial("tcp", ll.Addr().String(), &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11})
	if err == nil {
		raw.Close()
		t.Fatal("the tls gateway accepted TLS 1.1")
	}
	if _, err := NewDialer(Config{Name: "tls", Addr: ll.Addr().String(), TLS: &tls.Config{InsecureSkipVerify: true}}); err == nil {
		t.Fatal("the tls transport accepted InsecureSkipVerify without a pin")
	}
	if _, err := Listen(Config{Name: "tls", Addr: "127.0.0.1:0", TLS: &tls.Config{}}); err == nil {
		t.Fatal("a tls gateway without a certificate listened")
	}
}

// Errors about TLS settings name the setting, never a command-line flag.
func TestTLSConfigErrorsNameNoFlag(t *testing.T) {
	var errs []error
	_, err := NewCertStore(TLSFiles{Cert: "c.pem"})
	errs = append(errs, err)
	empty, _ := NewCertStore(TLSFiles{})
	_, err = empty.ServerConfig()
	errs = append(errs, err)
	_, err = Listen(Config{Name: "tls", Addr: "127.0.0.1:0"})
	errs = append(errs, err)
	_, err = Listen(Config{Name: "quic", Addr: "127.0.0.1:0"})
	errs = append(errs, err)
	_, err = ParseFingerprint("xyz")
	errs = append(errs, err)
	for _, err := range errs {
		if err == nil || strings.Contains(err.Error(), "--") {
			t.Errorf("error %v: want one that names no flag", err)
		}
	}
}

// A gateway hands every handshake the same config, fixed up for its
// transport, until a reload changes the certificate: crypto/tls keeps a
// connection's config for its life, and one per connection was half a KiB
// per idle session.
func TestServerConfigSharedUntilReload(t *testing.T) {
	dir := t.TempDir()
	ca, caKey, caPath := testnet.WriteCA(t, dir, "ca")
	cp, kp := testnet.WriteLeaf(t, dir, "gateway", ca, caKey, 2)
	store, err := NewCertStore(TLSFiles{Cert: cp, Key: kp, CA: caPath})
	if err != nil {
		t.Fatal(err)
	}
	sc, err := store.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"tls", "quic"} {
		tc, err := gatewayTLS(name, sc)
		if err != nil {
			t.Fatal(err)
		}
		get := func() *tls.Config {
			c, err := tc.GetConfigForClient(&tls.ClientHelloInfo{})
			if err != nil || c == nil {
				t.Fatalf("%s: GetConfigForClient: %v, %v", name, c, err)
			}
			return c
		}
		a, b := get(), get()
		if a != b {
			t.Fatalf("%s: two handshakes got two configs", name)
		}
		if want := transportTLS(name, a); a.MinVersion != want.MinVersion || !slices.Equal(a.NextProtos, want.NextProtos) || a.ClientAuth != tls.RequireAndVerifyClientCert {
			t.Fatalf("%s: shared config MinVersion %x, ALPN %q, ClientAuth %v; want %x, %q, mTLS", name, a.MinVersion, a.NextProtos, a.ClientAuth, want.MinVersion, want.NextProtos)
		}
		cp2, kp2 := testnet.WriteLeaf(t, t.TempDir(), "gateway", ca, caKey, 3)
		store.files.Cert, store.files.Key = cp2, kp2
		if err := store.Reload(); err != nil {
			t.Fatal(err)
		}
		c := get()
		if c == a || bytes.Equal(c.Certificates[0].Certificate[0], a.Certificates[0].Certificate[0]) {
			t.Fatalf("%s: after a reload, the same config (%v) or certificate", name, c == a)
		}
		if get() != c {
			t.Fatalf("%s: after a reload, two handshakes got two configs", name)
		}
	}
}
