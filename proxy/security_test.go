package proxy

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/lifeline-proxy/lifeline/frame"
	"github.com/lifeline-proxy/lifeline/internal/testnet"
	"github.com/lifeline-proxy/lifeline/proxy/transport"
	"github.com/lifeline-proxy/lifeline/resume"
)

// A RESUME for a live session with a wrong proof is refused with
// ACCESS_DENIED, and the session goes on.
func TestWrongResumeCredential(t *testing.T) {
	s := newStack(t, stackOpts{upstream: testnet.EchoServer(t)})
	d, _ := transport.NewDialer(transport.Config{Name: "tcp", Addr: s.gwAddr})
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

// mTLS: sessions work with a client certificate from the CA, a client
// without one is refused, and a certificate reload keeps live sessions.
func TestTLSMutualAndReload(t *testing.T) {
	dir := t.TempDir()
	ca, caKey, caPath := testnet.WriteCA(t, dir, "ca")
	gc, gk := testnet.WriteLeaf(t, dir, "gateway", ca, caKey, 2)
	cc, ck := testnet.WriteLeaf(t, dir, "client", ca, caKey, 3)
	gstore, err := transport.NewCertStore(transport.TLSFiles{Cert: gc, Key: gk, CA: caPath})
	if err != nil {
		t.Fatal(err)
	}
	stc, _ := gstore.ServerConfig()
	cstore, err := transport.NewCertStore(transport.TLSFiles{Cert: cc, Key: ck, CA: caPath})
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
	testnet.WriteLeaf(t, dir, "gateway", ca, caKey, 4)
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
	nostore, _ := transport.NewCertStore(transport.TLSFiles{CA: caPath})
	d, _ := transport.NewDialer(transport.Config{Name: "tls", Addr: s.gwAddr, TLS: nostore.ClientConfig()})
	_, err = resume.Dial(context.Background(), d.Dial, "default", fastConfig())
	if err == nil {
		t.Fatal("session without a client certificate was admitted")
	}
	t.Logf("without client cert: %v", err)
}
