package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/resume"
)

// A RESUME for a live session with a wrong proof is refused with
// ACCESS_DENIED, and the session goes on.
func TestWrongResumeCredential(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	d, _ := NewDialer("tcp", s.gwAddr, nil)
	sess, err := resume.Dial(context.Background(), d.Dial, "default", fastConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	c, err := net.Dial("tcp", s.gwAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := &frame.Resume{SessionID: sess.SessionID(), Counter: 9}
	r.Proof[0] = 1
	c.Write(frame.AppendResume(frame.AppendPreamble(nil), r))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(c)
	h, err := frame.ParseHeader(b)
	if err != nil || h.Type != frame.TypeReject {
		t.Fatalf("answer %x, want REJECT", b)
	}
	cr, _ := frame.ParseCodeReason(b[frame.HeaderLen : frame.HeaderLen+h.Len])
	if cr.Code != frame.CodeAccessDenied {
		t.Fatalf("REJECT %v, want ACCESS_DENIED", cr.Code)
	}
	sess.SetDeadline(time.Now().Add(5 * time.Second))
	sess.Write([]byte("still here"))
	got := make([]byte, 10)
	if _, err := io.ReadFull(sess, got); err != nil || string(got) != "still here" {
		t.Fatalf("session after bad resume: %q %v", got, err)
	}
}

// writeCert writes a self-signed CA and a leaf signed by it for 127.0.0.1.
func writeCA(t *testing.T, dir, name string) (*x509.Certificate, *ecdsa.PrivateKey, string) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	p := filepath.Join(dir, name+".pem")
	os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	return cert, key, p
}

func writeLeaf(t *testing.T, dir, name string, ca *x509.Certificate, caKey *ecdsa.PrivateKey, serial int64) (string, string) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	cp, kp := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	os.WriteFile(cp, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(kp, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	return cp, kp
}

// mTLS: sessions work with a client certificate from the CA, a client
// without one is refused, and a certificate reload keeps live sessions.
func TestTLSMutualAndReload(t *testing.T) {
	dir := t.TempDir()
	ca, caKey, caPath := writeCA(t, dir, "ca")
	gc, gk := writeLeaf(t, dir, "gateway", ca, caKey, 2)
	cc, ck := writeLeaf(t, dir, "client", ca, caKey, 3)
	gstore, err := NewCertStore(TLSFiles{Cert: gc, Key: gk, CA: caPath})
	if err != nil {
		t.Fatal(err)
	}
	stc, _ := gstore.ServerConfig()
	cstore, err := NewCertStore(TLSFiles{Cert: cc, Key: ck, CA: caPath})
	if err != nil {
		t.Fatal(err)
	}
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t), transport: "tls", serverTLS: stc, clientTLS: cstore.ClientConfig()})
	c := dialApp(t, s.appAddr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 5)
	c.Write([]byte("hello"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("%q %v", buf, err)
	}

	// Reload a new gateway certificate; the session resumes over a new TLS
	// link with it and carries on.
	writeLeaf(t, dir, "gateway", ca, caKey, 4)
	if err := gstore.Reload(); err != nil {
		t.Fatal(err)
	}
	s.relay.Reset()
	c.Write([]byte("again"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "again" {
		t.Fatalf("after reload: %q %v", buf, err)
	}
	if st := s.client.Sessions(); len(st) != 1 || st[0].Resumes < 1 {
		t.Fatalf("want one resumed session: %+v", st)
	}

	// No client certificate: refused at the TLS layer.
	nostore, _ := NewCertStore(TLSFiles{CA: caPath})
	d, _ := NewDialer("tls", s.gwAddr, nostore.ClientConfig())
	_, err = resume.Dial(context.Background(), d.Dial, "default", fastConfig())
	if err == nil {
		t.Fatal("session without a client certificate was admitted")
	}
	t.Logf("without client cert: %v", err)
}
