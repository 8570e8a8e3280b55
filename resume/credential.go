package resume

import (
	"context"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"net"

	"github.com/lifeline-proxy/lifeline/frame"
)

// The resume credential is a 32-byte key both ends derive from an X25519
// exchange in HELLO/WELCOME; it never crosses the wire. A RESUME proves
// possession with an HMAC over its own fields (session, a counter that must
// grow, fresh key share, offsets); RESUMED answers with an HMAC bound to the
// RESUME's proof, so the client knows it reached the gateway that holds the
// session. Each resume mixes a fresh X25519 exchange into the next
// credential, so a credential seen once (a core dump, a log) stops working
// after the next resume. See docs/protocol.md for the argument.
type credential [32]byte

const (
	labelInitial = "lifeline/1 credential"
	labelRotate  = "lifeline/1 rotate"
	labelResume  = "lifeline/1 resume"
	labelResumed = "lifeline/1 resumed"
)

func newKey() (*ecdh.PrivateKey, [frame.KeyLen]byte, error) {
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, [frame.KeyLen]byte{}, err
	}
	return k, [frame.KeyLen]byte(k.PublicKey().Bytes()), nil
}

func shared(priv *ecdh.PrivateKey, peer [frame.KeyLen]byte) ([]byte, error) {
	pub, err := ecdh.X25519().NewPublicKey(peer[:])
	if err != nil {
		return nil, err
	}
	return priv.ECDH(pub) // rejects the all-zero (low-order) result
}

// bindingLabel is the TLS exporter label (RFC 5705, RFC 8446 §7.5) of the
// link binding.
const bindingLabel = "EXPORTER-lifeline/1 link binding"

// keyingMaterialExporter is what a link that is not a *tls.Conn (a QUIC
// stream) implements to have its proofs bound to its TLS session.
type keyingMaterialExporter interface {
	ExportKeyingMaterial(label string, context []byte, length int) ([]byte, error)
}

// linkBinding returns 32 bytes that only the two ends of this TLS (or
// QUIC) connection can compute, or nil for a link without TLS. Mixed into
// the credential at HELLO and into every RESUME/RESUMED proof, it makes a
// recorded proof worthless on any other connection: an attacker who
// replays a RESUME from its own socket has a different TLS session. A
// *tls.Conn that has not finished its handshake finishes it first.
func linkBinding(ctx context.Context, c net.Conn) ([]byte, error) {
	switch c := c.(type) {
	case *tls.Conn:
		if err := c.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("TLS handshake: %w", err)
		}
		cs := c.ConnectionState()
		b, err := cs.ExportKeyingMaterial(bindingLabel, nil, 32)
		if err != nil {
			return nil, fmt.Errorf("link binding: %w", err)
		}
		return b, nil
	case keyingMaterialExporter:
		b, err := c.ExportKeyingMaterial(bindingLabel, nil, 32)
		if err != nil {
			return nil, fmt.Errorf("link binding: %w", err)
		}
		return b, nil
	}
	return nil, nil
}

func initialCredential(secret []byte, sid SessionID, clientKey, serverKey [frame.KeyLen]byte, binding []byte) credential {
	info := append(append(append([]byte(labelInitial), clientKey[:]...), serverKey[:]...), binding...)
	k, err := hkdf.Key(sha256.New, secret, sid[:], string(info), 32)
	if err != nil {
		panic(err) // only for lengths out of range
	}
	return credential(k)
}

func (c credential) rotate(secret []byte, sid SessionID, counter uint64) credential {
	info := binary.BigEndian.AppendUint64(append([]byte(labelRotate), sid[:]...), counter)
	k, err := hkdf.Key(sha256.New, secret, c[:], string(info), 32)
	if err != nil {
		panic(err)
	}
	return credential(k)
}

func (c credential) mac(label string, parts ...[]byte) [frame.ProofLen]byte {
	m := hmac.New(sha256.New, c[:])
	m.Write([]byte(label))
	for _, p := range parts {
		m.Write(p)
	}
	return [frame.ProofLen]byte(m.Sum(nil))
}

// resumeProof covers the RESUME and the link it travels on (binding, nil
// on a link without TLS).
func (c credential) resumeProof(r *frame.Resume, binding []byte) [frame.ProofLen]byte {
	return c.mac(labelResume, r.Signed(), binding)
}

func (c credential) resumedProof(r *frame.Resume, d *frame.Resumed, binding []byte) [frame.ProofLen]byte {
	return c.mac(labelResumed, r.Proof[:], d.Signed(), binding)
}

// verify compares in constant time.
func verify(want, got [frame.ProofLen]byte) bool { return hmac.Equal(want[:], got[:]) }
