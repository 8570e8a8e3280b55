package frame

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Magic opens every link, written by the client before its first message.
// It lets a gateway tell a lifeline client from a stray HTTP probe or port
// scanner with the first read, and reject it without allocating anything.
var Magic = [4]byte{'L', 'F', 'L', 'N'}

// Version is the protocol version carried after Magic. A gateway that does
// not speak it answers REJECT with CodeVersion.
const Version byte = 2

// PreambleLen is len(Magic) + the version byte.
const PreambleLen = 5

// HeaderLen is the size of every frame header: a type byte and a 24-bit
// big-endian payload length.
const HeaderLen = 4

// MaxPayload is the largest DATA payload the protocol allows. A decoder
// rejects a longer length before reading or allocating anything.
const MaxPayload = 64 << 10

// MaxReason bounds the human-readable reason in RESET, GOAWAY and REJECT.
const MaxReason = 256

// MaxRoute bounds the route name in HELLO.
const MaxRoute = 255

// MaxAppAddr bounds the application's address in HELLO.
const MaxAppAddr = 255

// Type identifies a frame. Values below 0x10 are data-phase frames, values
// from 0x10 are handshake messages; a decoder accepts each only in its phase.
type Type uint8

const (
	// DATA carries stream bytes. Payload: the bytes (1..MaxPayload). The
	// offset is implicit: the first DATA on a link starts at the offset the
	// peer stated in its handshake, each next one follows the previous.
	TypeData Type = 0x01
	// ACK: received u64 (cumulative bytes received), window u64 (absolute
	// offset the receiver accepts data up to), flags u8 (AckFin: the
	// peer's CLOSE_WRITE was received). 17 bytes.
	TypeAck Type = 0x02
	// PING: an opaque u64 (the sender's clock), echoed by PONG. 8 bytes.
	TypePing Type = 0x03
	// PONG: the u64 from the PING it answers. 8 bytes.
	TypePong Type = 0x04
	// CLOSE_WRITE: offset u64, the total number of bytes the sender will
	// ever send in this direction. 8 bytes.
	TypeCloseWrite Type = 0x05
	// RESET: code u16 then a UTF-8 reason (0..MaxReason bytes). Ends the
	// session. CodeNone means an orderly full close after the sender's data
	// and CLOSE_WRITE were acknowledged; any other code is an abort.
	TypeReset Type = 0x06
	// GOAWAY: code u16, the address to move to (u8 length, then
	// "host:port"; empty: the same one), a reason; see GoAway. Sent by a
	// gateway: move this session to a new link (dial and RESUME); the old
	// link stays usable until then.
	TypeGoAway Type = 0x07

	// HELLO opens a new session; see Hello for the layout.
	TypeHello Type = 0x10
	// WELCOME accepts a HELLO; see Welcome.
	TypeWelcome Type = 0x11
	// RESUME asks to attach this link to an existing session; see Resume.
	TypeResume Type = 0x12
	// RESUMED accepts a RESUME; see Resumed.
	TypeResumed Type = 0x13
	// REJECT refuses a HELLO or RESUME: code u16, for THROTTLED a u32
	// retry delay in ms, then a reason; see Reject. The server closes the
	// link after sending it.
	TypeReject Type = 0x14
)

var typeNames = map[Type]string{
	TypeData: "DATA", TypeAck: "ACK", TypePing: "PING", TypePong: "PONG",
	TypeCloseWrite: "CLOSE_WRITE", TypeReset: "RESET", TypeGoAway: "GOAWAY",
	TypeHello: "HELLO", TypeWelcome: "WELCOME", TypeResume: "RESUME",
	TypeResumed: "RESUMED", TypeReject: "REJECT",
}

func (t Type) String() string {
	if s, ok := typeNames[t]; ok {
		return s
	}
	return fmt.Sprintf("Type(0x%02x)", uint8(t))
}

// Handshake reports whether t is a handshake message.
func (t Type) Handshake() bool { return t >= TypeHello }

// Fixed payload sizes.
const (
	AckLen        = 17
	PingLen       = 8
	CloseWriteLen = 8
	KeyLen        = 32 // X25519 public key
	ProofLen      = 32 // HMAC-SHA256
	SessionIDLen  = 16
)

// AckFin is the ACK/RESUME/RESUMED flag saying the sender has received the
// peer's CLOSE_WRITE (all bytes up to its offset included).
const AckFin = 0x01

// maxLen is the largest payload each type may declare. Checked against the
// header before anything is read or allocated.
func maxLen(t Type) (min, max int, ok bool) {
	switch t {
	case TypeData:
		return 1, MaxPayload, true
	case TypeAck:
		return AckLen, AckLen, true
	case TypePing, TypePong:
		return PingLen, PingLen, true
	case TypeCloseWrite:
		return CloseWriteLen, CloseWriteLen, true
	case TypeReset:
		return 2, 2 + MaxReason, true
	case TypeGoAway:
		return 3, 3 + MaxAddr + MaxReason, true
	case TypeReject:
		return 2, 2 + 4 + MaxReason, true
	case TypeHello:
		return helloFixed, maxHello, true
	case TypeWelcome:
		return welcomeLen, welcomeLen, true
	case TypeResume:
		return resumeLen, resumeLen, true
	case TypeResumed:
		return resumedLen, resumedLen, true
	}
	return 0, 0, false
}

// Decoding errors. All wrap ErrMalformed so callers can map them to
// CodeValidation with one errors.Is.
var (
	ErrMalformed   = errors.New("frame: malformed")
	ErrUnknownType = fmt.Errorf("%w: unknown frame type", ErrMalformed)
	ErrLength      = fmt.Errorf("%w: bad length", ErrMalformed)
	ErrBadMagic    = errors.New("frame: not a lifeline link (bad magic)")
)

// Header is a decoded frame header.
type Header struct {
	Type Type
	Len  int
}

// PutHeader writes a header into b[:HeaderLen].
func PutHeader(b []byte, t Type, n int) {
	b[0] = byte(t)
	b[1] = byte(n >> 16)
	b[2] = byte(n >> 8)
	b[3] = byte(n)
}

// ParseHeader decodes and validates a header: the type must be known and
// the length within that type's bounds.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderLen {
		return Header{}, fmt.Errorf("%w: short header", ErrLength)
	}
	h := Header{Type: Type(b[0]), Len: int(b[1])<<16 | int(b[2])<<8 | int(b[3])}
	lo, hi, ok := maxLen(h.Type)
	if !ok {
		return h, fmt.Errorf("%w 0x%02x", ErrUnknownType, b[0])
	}
	if h.Len < lo || h.Len > hi {
		return h, fmt.Errorf("%w: %v with %d bytes (allowed %d..%d)", ErrLength, h.Type, h.Len, lo, hi)
	}
	return h, nil
}

// ParsePreamble checks the magic and returns the version the client speaks.
func ParsePreamble(b []byte) (byte, error) {
	if len(b) < PreambleLen || [4]byte(b[:4]) != Magic {
		return 0, ErrBadMagic
	}
	return b[4], nil
}

// AppendPreamble appends Magic and Version.
func AppendPreamble(b []byte) []byte {
	return append(append(b, Magic[:]...), Version)
}

// Ack is the payload of ACK.
type Ack struct {
	Received uint64 // bytes received (and held) from the peer
	Window   uint64 // the peer may send up to this absolute offset
	Flags    uint8  // AckFin
}

// AppendAck appends a whole ACK frame (header included).
func AppendAck(b []byte, a Ack) []byte {
	b = appendHeader(b, TypeAck, AckLen)
	b = binary.BigEndian.AppendUint64(b, a.Received)
	b = binary.BigEndian.AppendUint64(b, a.Window)
	return append(b, a.Flags)
}

// ParseAck decodes an ACK payload.
func ParseAck(p []byte) (Ack, error) {
	if len(p) != AckLen {
		return Ack{}, ErrLength
	}
	a := Ack{Received: binary.BigEndian.Uint64(p), Window: binary.BigEndian.Uint64(p[8:]), Flags: p[16]}
	if a.Flags&^AckFin != 0 {
		return a, fmt.Errorf("%w: unknown ACK flags 0x%02x", ErrMalformed, a.Flags)
	}
	return a, nil
}

// AppendU64 appends a frame whose payload is one u64: PING, PONG or
// CLOSE_WRITE.
func AppendU64(b []byte, t Type, v uint64) []byte {
	b = appendHeader(b, t, 8)
	return binary.BigEndian.AppendUint64(b, v)
}

// ParseU64 decodes the payload of PING, PONG or CLOSE_WRITE.
func ParseU64(p []byte) (uint64, error) {
	if len(p) != 8 {
		return 0, ErrLength
	}
	return binary.BigEndian.Uint64(p), nil
}

// AppendDataHeader appends the header of a DATA frame of n bytes; the
// caller sends the payload after it (typically from the replay buffer
// without copying).
func AppendDataHeader(b []byte, n int) []byte { return appendHeader(b, TypeData, n) }

// CodeReason is the payload of RESET, and of a REJECT whose code is not
// THROTTLED (see Reject).
type CodeReason struct {
	Code   Code
	Reason string
}

// AppendCodeReason appends a RESET (or a REJECT without a retry delay) of
// type t. A reason longer than MaxReason is truncated (at a byte boundary;
// it is for humans).
func AppendCodeReason(b []byte, t Type, c Code, reason string) []byte {
	if len(reason) > MaxReason {
		reason = reason[:MaxReason]
	}
	b = appendHeader(b, t, 2+len(reason))
	b = binary.BigEndian.AppendUint16(b, uint16(c))
	return append(b, reason...)
}

// ParseCodeReason decodes a RESET payload.
func ParseCodeReason(p []byte) (CodeReason, error) {
	if len(p) < 2 || len(p) > 2+MaxReason {
		return CodeReason{}, ErrLength
	}
	return CodeReason{Code: Code(binary.BigEndian.Uint16(p)), Reason: string(p[2:])}, nil
}

func appendHeader(b []byte, t Type, n int) []byte {
	return append(b, byte(t), byte(n>>16), byte(n>>8), byte(n))
}
