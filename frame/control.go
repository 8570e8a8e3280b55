package frame

import (
	"encoding/binary"
	"fmt"
	"time"
)

// MaxAddr bounds the address in GOAWAY.
const MaxAddr = 255

// GoAway is the payload of GOAWAY. Layout:
//
//	code    u16
//	addrLen u8
//	addr    [addrLen]  "host:port" to dial the new link to; empty: the
//	                   address the client dials anyway
//	reason  0..MaxReason bytes of UTF-8, for humans
//
// An operator moves sessions off a gateway by naming another one; the
// session's state stays where it is (the new gateway must be able to
// reach it, or be the same process on another listener).
type GoAway struct {
	Code   Code
	Addr   string
	Reason string
}

// AppendGoAway appends a GOAWAY frame. A reason longer than MaxReason is
// truncated; an address longer than MaxAddr is an error (it is acted on).
func AppendGoAway(b []byte, g GoAway) ([]byte, error) {
	if len(g.Addr) > MaxAddr {
		return b, fmt.Errorf("%w: GOAWAY address longer than %d bytes", ErrMalformed, MaxAddr)
	}
	reason := g.Reason
	if len(reason) > MaxReason {
		reason = reason[:MaxReason]
	}
	b = appendHeader(b, TypeGoAway, 3+len(g.Addr)+len(reason))
	b = binary.BigEndian.AppendUint16(b, uint16(g.Code))
	b = append(b, byte(len(g.Addr)))
	b = append(b, g.Addr...)
	return append(b, reason...), nil
}

// ParseGoAway decodes a GOAWAY payload.
func ParseGoAway(p []byte) (GoAway, error) {
	if len(p) < 3 {
		return GoAway{}, ErrLength
	}
	n := int(p[2])
	if len(p) < 3+n || len(p)-3-n > MaxReason {
		return GoAway{}, fmt.Errorf("%w: GOAWAY address length %d, %d bytes", ErrLength, n, len(p))
	}
	return GoAway{Code: Code(binary.BigEndian.Uint16(p)), Addr: string(p[3 : 3+n]), Reason: string(p[3+n:])}, nil
}

// Reject is the payload of REJECT. Layout:
//
//	code   u16
//	retry  u32   only when code is THROTTLED: milliseconds the client
//	             should wait before it tries again (0: its own backoff)
//	reason 0..MaxReason bytes of UTF-8, for humans
//
// Every other code has the RESET layout, so that a client of any version
// reads a REJECT VERSION.
type Reject struct {
	Code       Code
	RetryAfter time.Duration // THROTTLED only; millisecond resolution
	Reason     string
}

// maxRetry is the largest retry delay REJECT carries.
const maxRetry = time.Duration(1<<32-1) * time.Millisecond

// AppendReject appends a REJECT frame.
func AppendReject(b []byte, r Reject) []byte {
	if r.Code != CodeThrottled {
		return AppendCodeReason(b, TypeReject, r.Code, r.Reason)
	}
	reason := r.Reason
	if len(reason) > MaxReason {
		reason = reason[:MaxReason]
	}
	ms := min(max(r.RetryAfter, 0), maxRetry) / time.Millisecond
	b = appendHeader(b, TypeReject, 6+len(reason))
	b = binary.BigEndian.AppendUint16(b, uint16(r.Code))
	b = binary.BigEndian.AppendUint32(b, uint32(ms))
	return append(b, reason...)
}

// ParseReject decodes a REJECT payload.
func ParseReject(p []byte) (Reject, error) {
	if len(p) < 2 {
		return Reject{}, ErrLength
	}
	c := Code(binary.BigEndian.Uint16(p))
	if c != CodeThrottled {
		cr, err := ParseCodeReason(p)
		return Reject{Code: cr.Code, Reason: cr.Reason}, err
	}
	if len(p) < 6 || len(p) > 6+MaxReason {
		return Reject{}, fmt.Errorf("%w: THROTTLED REJECT of %d bytes", ErrLength, len(p))
	}
	ms := binary.BigEndian.Uint32(p[2:])
	return Reject{Code: c, RetryAfter: time.Duration(ms) * time.Millisecond, Reason: string(p[6:])}, nil
}
