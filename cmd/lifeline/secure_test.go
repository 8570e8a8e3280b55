package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// testCA writes a CA certificate to dir/name.pem.
func testCA(t *testing.T, dir, name string) (*x509.Certificate, *ecdsa.PrivateKey, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	p := filepath.Join(dir, name+".pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return cert, key, p
}

// testLeaf writes a server certificate for 127.0.0.1 signed by ca, and its
// key; it returns the paths and the certificate's SHA-256.
func testLeaf(t *testing.T, dir, name string, ca *x509.Certificate, caKey *ecdsa.PrivateKey) (certPath, keyPath, fp string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(key)
	certPath, keyPath = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600)
	sum := sha256.Sum256(der)
	return certPath, keyPath, hex.EncodeToString(sum[:])
}

func stopProc(t *testing.T, p *proc) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	if code := p.wait(10 * time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM", code)
	}
}

// Secure by default (issue 8, item 3): with no --transport, a gateway
// without --tls-cert serves TLS with a key pair it generates once and
// keeps in --state-dir (0600 in 0700), logs the same fingerprint at every
// start with the client command that pins it, and a client given that pin
// (and no --transport either) carries data through it.
func TestDefaultGatewayKeepsOneCertificateAcrossRestarts(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	state := filepath.Join(t.TempDir(), "state")
	up := testnet.EchoServer(t)
	gwArgs := append([]string{"gateway", "--listen", "127.0.0.1:0", "--upstream", up, "--state-dir", state}, fast...)

	gw := startProc(t, gwArgs...)
	pin := gw.waitLog(gatewayPinMsg, 30*time.Second)
	fp, _ := pin["sha256"].(string)
	if len(fp) != 64 || pin["generated_now"] != true {
		t.Fatalf("first start: %v", pin)
	}
	listening := gw.waitLog("gateway listening", 30*time.Second)
	if listening["transport"] != "tls" {
		t.Fatalf("default transport %v, want tls", listening["transport"])
	}
	_, port, _ := net.SplitHostPort(listening["addr"].(string))
	if hint, _ := pin["client"].(string); !strings.HasPrefix(hint, "lifeline client ") ||
		!strings.Contains(hint, "--tls-pin "+fp) || !strings.Contains(hint, "--gateway 127.0.0.1:"+port) {
		t.Fatalf("client hint %q lacks the pin or the gateway address", hint)
	}
	file := filepath.Join(state, transport.GatewayCertFile)
	if pin["file"] != file {
		t.Fatalf("kept in %v, want %s", pin["file"], file)
	}
	for path, want := range map[string]os.FileMode{state: 0o700, file: 0o600} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s: mode %04o, want %04o", path, st.Mode().Perm(), want)
		}
	}
	entries, _ := os.ReadDir(state)
	if len(entries) != 1 {
		t.Errorf("state directory holds %d entries, want the one file (no temporary left)", len(entries))
	}
	before, _ := os.ReadFile(file)
	stopProc(t, gw)

	gw = startProc(t, gwArgs...)
	pin = gw.waitLog(gatewayPinMsg, 30*time.Second)
	if pin["sha256"] != fp || pin["generated_now"] != false {
		t.Fatalf("after a restart: %v, want sha256 %s, not generated", pin, fp)
	}
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	if after, _ := os.ReadFile(file); string(after) != string(before) {
		t.Fatal("the restart rewrote the key pair")
	}

	app := freeAddr(t)
	cl := startProc(t, append([]string{"client", "--listen", app, "--gateway", gwAddr, "--tls-pin", fp}, fast...)...)
	cl.waitLog("client listening", 30*time.Second)
	if err := echoCheck(app, randomData(200<<10, 11), 11); err != nil {
		t.Fatalf("through the default transport with the logged pin: %v", err)
	}
	for _, p := range []*proc{gw, cl} {
		if n := p.count(plaintextWarning); n != 0 {
			t.Errorf("%s warned about plaintext on a tls link", p.cmd.Args[1])
		}
	}
}

// A key pair file that does not parse is an error naming it, and is left
// as it is: clients pin the certificate, so it is never silently replaced.
func TestCorruptGatewayKeyPairIsAnError(t *testing.T) {
	state := t.TempDir()
	os.Chmod(state, 0o700)
	file := filepath.Join(state, transport.GatewayCertFile)
	garbage := []byte("-----BEGIN CERTIFICATE-----\nnot base64\n")
	if err := os.WriteFile(file, garbage, 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCLI("gateway", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--state-dir", state)
	if code != 1 {
		t.Fatalf("exit code %d, want 1: %s", code, stderr)
	}
	oneLineErr(t, stderr)
	if !strings.Contains(stderr, file) || !strings.Contains(stderr, "corrupt") {
		t.Fatalf("error %q does not name the corrupt file", stderr)
	}
	if b, _ := os.ReadFile(file); string(b) != string(garbage) {
		t.Fatalf("the corrupt file was replaced: %q", b)
	}
}

// Secure by default, client side (issue 8, items 3 and 8): a client with
// neither --tls-ca nor --tls-pin (and no --transport) verifies the gateway
// against the system roots. When they hold the gateway's CA, data flows.
// When they do not, the application is reset at once (not after the 60 s
// reconnect timeout) and the first failure is logged at once, with the
// gateway's actual fingerprint to pin and the --tls-ca alternative.
func TestDefaultClientVerifiesGatewayAgainstSystemRoots(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	dir := t.TempDir()
	ca, caKey, caPath := testCA(t, dir, "ca")
	_, _, otherCA := testCA(t, dir, "other-ca")
	cert, key, leafFP := testLeaf(t, dir, "gateway", ca, caKey)
	noDir := t.TempDir()

	gw := startProc(t, append([]string{"gateway", "--listen", "127.0.0.1:0", "--upstream", testnet.EchoServer(t),
		"--tls-cert", cert, "--tls-key", key}, fast...)...)
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)

	// SSL_CERT_FILE and SSL_CERT_DIR replace the system roots for Go.
	trusted := freeAddr(t)
	cl := startProcEnv(t, []string{"SSL_CERT_FILE=" + caPath, "SSL_CERT_DIR=" + noDir},
		append([]string{"client", "--listen", trusted, "--gateway", gwAddr}, fast...)...)
	cl.waitLog("client listening", 30*time.Second)
	if err := echoCheck(trusted, randomData(100<<10, 3), 3); err != nil {
		t.Fatalf("gateway certificate from a CA in the system roots: %v", err)
	}

	untrusted := freeAddr(t)
	bad := startProcEnv(t, []string{"SSL_CERT_FILE=" + otherCA, "SSL_CERT_DIR=" + noDir},
		append([]string{"client", "--listen", untrusted, "--gateway", gwAddr}, fast...)...)
	bad.waitLog("client listening", 30*time.Second)
	const certMsg = "gateway certificate verification failed; no link to this gateway until it is fixed"
	for i := range 2 {
		start := time.Now()
		c, err := net.Dial("tcp", untrusted)
		if err == nil {
			c.Write([]byte("hello"))
			testnet.ExpectReset(t, c, 10*time.Second)
			c.Close()
		} else if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("connection %d: reset after %v; a certificate failure must not be retried for the reconnect timeout", i, d)
		}
		m := bad.waitLog(certMsg, 5*time.Second)
		if m["level"] != "ERROR" || m["gateway_sha256"] != leafFP {
			t.Fatalf("log line %v: want ERROR with gateway_sha256 %s", m, leafFP)
		}
		if fix, _ := m["fix"].(string); !strings.Contains(fix, "--tls-pin "+leafFP) || !strings.Contains(fix, "--tls-ca") {
			t.Fatalf("fix %q lacks the pin or --tls-ca", fix)
		}
	}
	if n := bad.count(certMsg); n != 1 {
		t.Errorf("%d certificate failure lines for two failures within a minute, want 1 (rate-limited)", n)
	}
}

// --transport tcp still works and says, once at start, that a link
// beyond loopback is unauthenticated and unencrypted (issue 8, item 3).
func TestTCPTransportWarnsBeyondLoopback(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary")
	}
	for addr, want := range map[string]bool{
		"127.0.0.1:7000": true, "127.0.0.2:7000": true, "[::1]:7000": true, "localhost:7000": true, "gw.localhost:1": true,
		"0.0.0.0:7000": false, ":7000": false, "[::]:7000": false, "10.0.0.1:7000": false, "gw.example.net:7000": false,
	} {
		if got := isLoopbackHostPort(addr); got != want {
			t.Errorf("isLoopbackHostPort(%q) = %v, want %v", addr, got, want)
		}
	}

	// 192.0.2.1 (TEST-NET-1) is never dialed: no application connects.
	far := startProc(t, "client", "--transport", "tcp", "--listen", freeAddr(t), "--gateway", "192.0.2.1:7000")
	m := far.waitLog(plaintextWarning, 30*time.Second)
	if m["level"] != "WARN" || m["gateway"] != "192.0.2.1:7000" {
		t.Fatalf("warning %v", m)
	}
	gw := startProc(t, "gateway", "--transport", "tcp", "--listen", "127.0.0.1:0", "--upstream", testnet.EchoServer(t))
	gwAddr := gw.waitLog("gateway listening", 30*time.Second)["addr"].(string)
	near := startProc(t, "client", "--transport", "tcp", "--listen", freeAddr(t), "--gateway", gwAddr)
	near.waitLog("client listening", 30*time.Second)
	// Both warn, if at all, before they log that they listen.
	if gw.count(plaintextWarning)+near.count(plaintextWarning) != 0 {
		t.Errorf("plaintext warning on loopback:\n%s\n%s", gw.output(), near.output())
	}
}
