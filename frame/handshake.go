package frame

import (
	"encoding/binary"
	"fmt"
)

// Hello opens a new session. Layout (big-endian):
//
//	key      [32]  client's ephemeral X25519 public key
//	timeout  u32   reconnect timeout the client wants, in milliseconds (0: no resumption)
//	buffer   u32   client's receive window in bytes (its initial Window)
//	routeLen u8
//	route    [routeLen]
//	then, optionally (absent: the payload ends after route):
//	appLen   u8    1..MaxAppAddr
//	app      [appLen]  the application's own address as the client
//	               sidecar saw it, text "ip:port"
//
// App is an extension within protocol version 2: a gateway of an earlier
// build refuses a HELLO that carries it (its length check), so a client
// sends it only when told to.
type Hello struct {
	Key              [KeyLen]byte
	ReconnectTimeout uint32
	Buffer           uint32
	Route            string
	App              string // "": absent
}

const helloFixed = KeyLen + 4 + 4 + 1

// maxHello is the longest HELLO payload: the longest route and app.
const maxHello = helloFixed + MaxRoute + 1 + MaxAppAddr

// AppendHello appends a HELLO frame.
func AppendHello(b []byte, h *Hello) ([]byte, error) {
	if len(h.Route) > MaxRoute {
		return b, fmt.Errorf("%w: route longer than %d bytes", ErrMalformed, MaxRoute)
	}
	if len(h.App) > MaxAppAddr {
		return b, fmt.Errorf("%w: application address longer than %d bytes", ErrMalformed, MaxAppAddr)
	}
	n := helloFixed + len(h.Route)
	if h.App != "" {
		n += 1 + len(h.App)
	}
	b = appendHeader(b, TypeHello, n)
	b = append(b, h.Key[:]...)
	b = binary.BigEndian.AppendUint32(b, h.ReconnectTimeout)
	b = binary.BigEndian.AppendUint32(b, h.Buffer)
	b = append(b, byte(len(h.Route)))
	b = append(b, h.Route...)
	if h.App != "" {
		b = append(b, byte(len(h.App)))
		b = append(b, h.App...)
	}
	return b, nil
}

// ParseHello decodes a HELLO payload.
func ParseHello(p []byte) (*Hello, error) {
	if len(p) < helloFixed {
		return nil, ErrLength
	}
	h := &Hello{}
	copy(h.Key[:], p)
	p = p[KeyLen:]
	h.ReconnectTimeout = binary.BigEndian.Uint32(p)
	h.Buffer = binary.BigEndian.Uint32(p[4:])
	n := int(p[8])
	p = p[9:]
	if len(p) < n {
		return nil, fmt.Errorf("%w: HELLO route length %d, %d bytes left", ErrLength, n, len(p))
	}
	h.Route = string(p[:n])
	p = p[n:]
	if len(p) == 0 {
		return h, nil
	}
	// The application's address: exactly appLen bytes follow, and an
	// empty one is written by leaving the field out (one encoding per
	// HELLO).
	n = int(p[0])
	p = p[1:]
	if n == 0 || len(p) != n {
		return nil, fmt.Errorf("%w: HELLO application address length %d, %d bytes left", ErrLength, n, len(p))
	}
	h.App = string(p)
	return h, nil
}

// Welcome accepts a HELLO. Layout:
//
//	session  [16]  session id, random
//	key      [32]  gateway's ephemeral X25519 public key
//	timeout  u32   effective reconnect timeout, ms: min(client's, gateway's)
//	buffer   u32   gateway's receive window in bytes
//
// The resume credential is derived by both sides from the X25519 exchange
// and never sent (see docs/protocol.md).
type Welcome struct {
	SessionID        [SessionIDLen]byte
	Key              [KeyLen]byte
	ReconnectTimeout uint32
	Buffer           uint32
}

const welcomeLen = SessionIDLen + KeyLen + 4 + 4

// AppendWelcome appends a WELCOME frame.
func AppendWelcome(b []byte, w *Welcome) []byte {
	b = appendHeader(b, TypeWelcome, welcomeLen)
	b = append(b, w.SessionID[:]...)
	b = append(b, w.Key[:]...)
	b = binary.BigEndian.AppendUint32(b, w.ReconnectTimeout)
	return binary.BigEndian.AppendUint32(b, w.Buffer)
}

// ParseWelcome decodes a WELCOME payload.
func ParseWelcome(p []byte) (*Welcome, error) {
	if len(p) != welcomeLen {
		return nil, ErrLength
	}
	w := &Welcome{}
	copy(w.SessionID[:], p)
	copy(w.Key[:], p[SessionIDLen:])
	p = p[SessionIDLen+KeyLen:]
	w.ReconnectTimeout = binary.BigEndian.Uint32(p)
	w.Buffer = binary.BigEndian.Uint32(p[4:])
	return w, nil
}

// Resume asks to attach a link to an existing session. Layout:
//
//	session  [16]
//	counter  u64   must exceed every counter the gateway accepted for this session
//	key      [32]  fresh X25519 public key, for rotating the credential
//	received u64   bytes the client has received from the gateway
//	window   u64   absolute offset the gateway may send up to
//	flags    u8    AckFin
//	proof    [32]  HMAC-SHA256(credential, "lifeline/1 resume" || all fields above)
type Resume struct {
	SessionID [SessionIDLen]byte
	Counter   uint64
	Key       [KeyLen]byte
	Received  uint64
	Window    uint64
	Flags     uint8
	Proof     [ProofLen]byte
}

const resumeLen = SessionIDLen + 8 + KeyLen + 8 + 8 + 1 + ProofLen

// Signed returns the bytes of r that its Proof covers.
func (r *Resume) Signed() []byte {
	b := make([]byte, 0, resumeLen-ProofLen)
	b = append(b, r.SessionID[:]...)
	b = binary.BigEndian.AppendUint64(b, r.Counter)
	b = append(b, r.Key[:]...)
	b = binary.BigEndian.AppendUint64(b, r.Received)
	b = binary.BigEndian.AppendUint64(b, r.Window)
	return append(b, r.Flags)
}

// AppendResume appends a RESUME frame.
func AppendResume(b []byte, r *Resume) []byte {
	b = appendHeader(b, TypeResume, resumeLen)
	b = append(b, r.Signed()...)
	return append(b, r.Proof[:]...)
}

// ParseResume decodes a RESUME payload.
func ParseResume(p []byte) (*Resume, error) {
	if len(p) != resumeLen {
		return nil, ErrLength
	}
	r := &Resume{}
	copy(r.SessionID[:], p)
	p = p[SessionIDLen:]
	r.Counter = binary.BigEndian.Uint64(p)
	copy(r.Key[:], p[8:])
	p = p[8+KeyLen:]
	r.Received = binary.BigEndian.Uint64(p)
	r.Window = binary.BigEndian.Uint64(p[8:])
	r.Flags = p[16]
	copy(r.Proof[:], p[17:])
	if r.Flags&^AckFin != 0 {
		return nil, fmt.Errorf("%w: unknown RESUME flags 0x%02x", ErrMalformed, r.Flags)
	}
	return r, nil
}

// Resumed accepts a RESUME. Layout:
//
//	key      [32]  gateway's fresh X25519 public key
//	received u64   bytes the gateway has received from the client
//	window   u64   absolute offset the client may send up to
//	flags    u8    AckFin
//	resend   u64   offset of the first DATA byte the gateway sends on this
//	               link: max(RESUME.received, the highest ACK it processed)
//	proof    [32]  HMAC-SHA256(credential, "lifeline/1 resumed" || RESUME proof || fields above)
//
// resend exists because RESUME.received can be stale: during a GOAWAY
// migration the client keeps receiving and acknowledging on the old link
// after it sent RESUME, and the gateway may have freed those bytes.
type Resumed struct {
	Key      [KeyLen]byte
	Received uint64
	Window   uint64
	Flags    uint8
	Resend   uint64
	Proof    [ProofLen]byte
}

const resumedLen = KeyLen + 8 + 8 + 1 + 8 + ProofLen

// Signed returns the bytes of r that its Proof covers (after the RESUME proof).
func (r *Resumed) Signed() []byte {
	b := make([]byte, 0, resumedLen-ProofLen)
	b = append(b, r.Key[:]...)
	b = binary.BigEndian.AppendUint64(b, r.Received)
	b = binary.BigEndian.AppendUint64(b, r.Window)
	b = append(b, r.Flags)
	return binary.BigEndian.AppendUint64(b, r.Resend)
}

// AppendResumed appends a RESUMED frame.
func AppendResumed(b []byte, r *Resumed) []byte {
	b = appendHeader(b, TypeResumed, resumedLen)
	b = append(b, r.Signed()...)
	return append(b, r.Proof[:]...)
}

// ParseResumed decodes a RESUMED payload.
func ParseResumed(p []byte) (*Resumed, error) {
	if len(p) != resumedLen {
		return nil, ErrLength
	}
	r := &Resumed{}
	copy(r.Key[:], p)
	p = p[KeyLen:]
	r.Received = binary.BigEndian.Uint64(p)
	r.Window = binary.BigEndian.Uint64(p[8:])
	r.Flags = p[16]
	r.Resend = binary.BigEndian.Uint64(p[17:])
	copy(r.Proof[:], p[25:])
	if r.Flags&^AckFin != 0 {
		return nil, fmt.Errorf("%w: unknown RESUMED flags 0x%02x", ErrMalformed, r.Flags)
	}
	return r, nil
}
