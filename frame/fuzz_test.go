package frame_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/lifeline-proxy/lifeline/frame"
)

// The seed corpus in testdata/fuzz/<FuzzName>/ holds valid frames and
// near misses (one byte short, one byte long, unknown flags, a route length
// that disagrees with the payload). The f.Add seeds below come from the
// encoders, so they follow any deliberate change of the format.

// wireBounds is the payload length range of every frame type, from the
// spec (docs/protocol.md), independent of the constants in frame/.
var wireBounds = map[frame.Type][2]int{
	frame.TypeData:       {1, wantMaxPayload},
	frame.TypeAck:        {wantAckLen, wantAckLen},
	frame.TypePing:       {8, 8},
	frame.TypePong:       {8, 8},
	frame.TypeCloseWrite: {8, 8},
	frame.TypeReset:      {2, 2 + wantMaxReason},
	frame.TypeGoAway:     {3, 3 + 255 + wantMaxReason},
	frame.TypeReject:     {2, 2 + 4 + wantMaxReason},
	frame.TypeHello:      {wantHelloFixed, wantMaxHello},
	frame.TypeWelcome:    {wantWelcomeLen, wantWelcomeLen},
	frame.TypeResume:     {wantResumeLen, wantResumeLen},
	frame.TypeResumed:    {wantResumedLen, wantResumedLen},
}

// validFrames returns one or more valid frames of every type, headers
// included.
func validFrames(t testing.TB) [][]byte {
	var out [][]byte
	for _, c := range messageCases(t) {
		out = append(out, c.enc)
	}
	out = append(out, append(frame.AppendDataHeader(nil, 3), "abc"...))
	return out
}

// payloadsOf returns the payloads of the valid frames of type typ.
func payloadsOf(t testing.TB, typ frame.Type) [][]byte {
	var out [][]byte
	for _, b := range validFrames(t) {
		if frame.Type(b[0]) == typ {
			out = append(out, b[frame.HeaderLen:])
		}
	}
	return out
}

// addPayloadSeeds adds every valid payload of the given types, and each one
// byte short and one byte long.
func addPayloadSeeds(f *testing.F, types ...frame.Type) {
	for _, typ := range types {
		for _, p := range payloadsOf(f, typ) {
			f.Add(p)
			f.Add(p[:len(p)-1])
			f.Add(append(append([]byte(nil), p...), 0))
		}
	}
}

// addFlagSeeds adds the valid payloads of type typ with the flags byte at
// offset at set to each single unknown bit.
func addFlagSeeds(f *testing.F, typ frame.Type, at int) {
	for _, p := range payloadsOf(f, typ) {
		for bit := 1; bit < 8; bit++ {
			q := append([]byte(nil), p...)
			q[at] |= 1 << bit
			f.Add(q)
		}
	}
}

// reencodeFrame parses payload p of a control frame of type typ and, if it
// parses, encodes the value again as a whole frame. It also parses the
// re-encoded payload and checks that it yields the same value.
func reencodeFrame(t *testing.T, typ frame.Type, p []byte) ([]byte, error) {
	t.Helper()
	var v any
	var err error
	switch typ {
	case frame.TypeAck:
		v, err = frame.ParseAck(p)
	case frame.TypePing, frame.TypePong, frame.TypeCloseWrite:
		v, err = frame.ParseU64(p)
	case frame.TypeReset:
		v, err = frame.ParseCodeReason(p)
	case frame.TypeGoAway:
		v, err = frame.ParseGoAway(p)
	case frame.TypeReject:
		v, err = frame.ParseReject(p)
	case frame.TypeHello:
		v, err = frame.ParseHello(p)
	case frame.TypeWelcome:
		v, err = frame.ParseWelcome(p)
	case frame.TypeResume:
		v, err = frame.ParseResume(p)
	case frame.TypeResumed:
		v, err = frame.ParseResumed(p)
	default:
		t.Fatalf("reencodeFrame(%v)", typ)
	}
	if err != nil {
		if !errors.Is(err, frame.ErrMalformed) {
			t.Fatalf("%v: error %v does not wrap ErrMalformed", typ, err)
		}
		return nil, err
	}
	enc := reencode(t, nil, typ, v)
	h, err := frame.ParseHeader(enc)
	if err != nil || h.Type != typ || h.Len != len(enc)-frame.HeaderLen {
		t.Fatalf("%v: re-encoded header %+v, %v for %d bytes", typ, h, err, len(enc))
	}
	again, err := reencodeParse(typ, enc[frame.HeaderLen:])
	if err != nil {
		t.Fatalf("%v: re-encoded frame does not parse: %v", typ, err)
	}
	if !reflect.DeepEqual(again, v) {
		t.Fatalf("%v: parse/append/parse changed the value:\n first %+v\nsecond %+v", typ, v, again)
	}
	return enc, nil
}

func reencodeParse(typ frame.Type, p []byte) (any, error) {
	switch typ {
	case frame.TypeAck:
		return frame.ParseAck(p)
	case frame.TypePing, frame.TypePong, frame.TypeCloseWrite:
		return frame.ParseU64(p)
	case frame.TypeReset:
		return frame.ParseCodeReason(p)
	case frame.TypeGoAway:
		return frame.ParseGoAway(p)
	case frame.TypeReject:
		return frame.ParseReject(p)
	case frame.TypeHello:
		return frame.ParseHello(p)
	case frame.TypeWelcome:
		return frame.ParseWelcome(p)
	case frame.TypeResume:
		return frame.ParseResume(p)
	case frame.TypeResumed:
		return frame.ParseResumed(p)
	}
	return nil, errors.New("unknown type")
}

// checkCanonical asserts that a payload that parsed re-encodes to exactly
// the same bytes: every field is fixed-size or length-delimited, so there
// is one encoding per value.
func checkCanonical(t *testing.T, typ frame.Type, p []byte) {
	t.Helper()
	enc, err := reencodeFrame(t, typ, p)
	if err != nil {
		t.Fatalf("%v: payload %x parsed the first time only: %v", typ, p, err)
	}
	if !bytes.Equal(enc[frame.HeaderLen:], p) {
		t.Fatalf("%v: payload\n  %x\nre-encodes as\n  %x", typ, p, enc[frame.HeaderLen:])
	}
}

func FuzzParseHeader(f *testing.F) {
	for _, b := range validFrames(f) {
		f.Add(b[:frame.HeaderLen])
	}
	for typ, b := range wireBounds { // one below the minimum, one above the maximum
		for _, n := range []int{b[0] - 1, b[1] + 1} {
			var h [frame.HeaderLen]byte
			frame.PutHeader(h[:], typ, n)
			f.Add(h[:])
		}
	}
	f.Add([]byte{0x15, 0x00, 0x00, 0x02}) // unknown type
	f.Add([]byte{0x10, 0x00, 0x00})       // short header
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := frame.ParseHeader(b)
		if len(b) < frame.HeaderLen {
			if !errors.Is(err, frame.ErrLength) {
				t.Fatalf("%d-byte header: err %v, want ErrLength", len(b), err)
			}
			return
		}
		typ := frame.Type(b[0])
		n := int(b[1])<<16 | int(b[2])<<8 | int(b[3])
		bounds, known := wireBounds[typ]
		switch {
		case !known:
			if !errors.Is(err, frame.ErrUnknownType) {
				t.Fatalf("type %v: err %v, want ErrUnknownType", typ, err)
			}
			if want := fmt.Sprintf("Type(0x%02x)", uint8(typ)); typ.String() != want {
				t.Fatalf("unknown type named %q, want %q", typ.String(), want)
			}
			return
		case n < bounds[0] || n > bounds[1]:
			if !errors.Is(err, frame.ErrLength) || !errors.Is(err, frame.ErrMalformed) {
				t.Fatalf("%v with %d bytes: err %v, want ErrLength", typ, n, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("%v with %d bytes: %v", typ, n, err)
		}
		if h.Type != typ || h.Len != n {
			t.Fatalf("header %x parsed as %+v", b[:4], h)
		}
		if strings.HasPrefix(h.Type.String(), "Type(") {
			t.Fatalf("known type %d has no name", uint8(h.Type))
		}
		var enc [frame.HeaderLen]byte
		frame.PutHeader(enc[:], h.Type, h.Len)
		if !bytes.Equal(enc[:], b[:frame.HeaderLen]) {
			t.Fatalf("header %x re-encodes as %x", b[:4], enc)
		}
		if h.Type.Handshake() != (h.Type >= 0x10) {
			t.Fatalf("%v.Handshake() = %v", h.Type, h.Type.Handshake())
		}
	})
}

// FuzzReader feeds arbitrary bytes through a Reader. The first argument
// picks how: bit 0 reads a preamble first, bit 1 calls Next while DATA is
// unread (it must refuse), bit 7 makes the source return one byte per Read,
// bits 2-6 pick the ReadData buffer size. Every frame the Reader accepts
// must be exactly the bytes that ParseHeader and the payload decoders see
// in the input, and must re-encode to the same bytes.
func FuzzReader(f *testing.F) {
	var all []byte
	all = frame.AppendPreamble(all)
	for _, b := range validFrames(f) {
		f.Add(byte(0), b)
		f.Add(byte(0x84), b[:len(b)-1])
		all = append(all, b...)
	}
	f.Add(byte(0x03), all)
	f.Add(byte(0x7e), all[frame.PreambleLen:])
	f.Add(byte(0x01), []byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add(byte(0x02), append(frame.AppendDataHeader(nil, 100), make([]byte, 100)...))
	f.Fuzz(func(t *testing.T, mode byte, data []byte) {
		var src io.Reader = bytes.NewReader(data)
		if mode&0x80 != 0 {
			src = iotest.OneByteReader(src)
		}
		interrupt := mode&0x02 != 0
		chunk := make([]byte, int(mode>>2&0x1f)*61+1)
		r := frame.NewReader(src, 16)
		pos := 0

		if mode&0x01 != 0 {
			v, err := r.ReadPreamble()
			switch {
			case len(data) < frame.PreambleLen:
				if err != io.ErrUnexpectedEOF {
					t.Fatalf("preamble of %d bytes: err %v", len(data), err)
				}
				return
			case string(data[:4]) != "LFLN":
				if err != frame.ErrBadMagic {
					t.Fatalf("preamble %q: err %v, want ErrBadMagic", data[:5], err)
				}
				return
			case err != nil || v != data[4]:
				t.Fatalf("preamble %q: %d, %v", data[:5], v, err)
			}
			pos = frame.PreambleLen
		}

		for {
			rest := data[pos:]
			h, err := r.Next()
			if err != nil {
				switch {
				case len(rest) == 0:
					if err != io.EOF {
						t.Fatalf("at a frame boundary at the end: err %v, want io.EOF", err)
					}
				case len(rest) < frame.HeaderLen:
					if err != io.ErrUnexpectedEOF {
						t.Fatalf("%d header bytes then EOF: err %v, want io.ErrUnexpectedEOF", len(rest), err)
					}
				default:
					if _, perr := frame.ParseHeader(rest); perr == nil || !errors.Is(err, frame.ErrMalformed) {
						t.Fatalf("header %x: Reader says %v, ParseHeader says %v", rest[:4], err, perr)
					}
				}
				return
			}
			if want, err := frame.ParseHeader(rest); err != nil || want != h {
				t.Fatalf("Reader accepted header %+v; ParseHeader(%x) = %+v, %v", h, rest[:min(4, len(rest))], want, err)
			}
			if b, ok := wireBounds[h.Type]; !ok || h.Len < b[0] || h.Len > b[1] {
				t.Fatalf("Reader accepted %v with %d bytes", h.Type, h.Len)
			}
			pos += frame.HeaderLen
			end := pos + h.Len
			body := data[pos:min(end, len(data))]

			if h.Type == frame.TypeData {
				if r.DataRemaining() != h.Len {
					t.Fatalf("DataRemaining %d after a %d-byte DATA header", r.DataRemaining(), h.Len)
				}
				var got []byte
				for r.DataRemaining() > 0 {
					before := r.DataRemaining()
					if interrupt {
						if _, err := r.Next(); err == nil {
							t.Fatalf("Next accepted with %d DATA bytes unread", before)
						}
						if r.DataRemaining() != before {
							t.Fatalf("refused Next changed DataRemaining %d -> %d", before, r.DataRemaining())
						}
					}
					n, err := r.ReadData(chunk)
					if n < 0 || n > min(len(chunk), before) || r.DataRemaining() != before-n {
						t.Fatalf("ReadData(%d) with %d left returned %d, %d left", len(chunk), before, n, r.DataRemaining())
					}
					got = append(got, chunk[:n]...)
					if err != nil {
						if err != io.ErrUnexpectedEOF || end <= len(data) || !bytes.Equal(got, body) {
							t.Fatalf("ReadData: %v with %d of %d bytes, got %d", err, len(body), h.Len, len(got))
						}
						return
					}
					if n != min(len(chunk), before) {
						t.Fatalf("short ReadData: %d of %d", n, min(len(chunk), before))
					}
				}
				if !bytes.Equal(got, body) || len(got) != h.Len {
					t.Fatalf("DATA payload differs from the input")
				}
				enc := append(frame.AppendDataHeader(nil, len(got)), got...)
				if !bytes.Equal(enc, data[pos-frame.HeaderLen:end]) {
					t.Fatalf("DATA frame re-encodes differently")
				}
				pos = end
				continue
			}

			p, err := r.Payload(h)
			if err != nil {
				if err != io.ErrUnexpectedEOF || end <= len(data) {
					t.Fatalf("Payload(%+v) with %d bytes available: %v", h, len(body), err)
				}
				return
			}
			if len(p) != h.Len || !bytes.Equal(p, body) {
				t.Fatalf("Payload(%+v) = %x, input has %x", h, p, body)
			}
			if enc, err := reencodeFrame(t, h.Type, p); err == nil {
				if !bytes.Equal(enc, data[pos-frame.HeaderLen:end]) {
					t.Fatalf("%v frame\n  %x\nre-encodes as\n  %x", h.Type, data[pos-frame.HeaderLen:end], enc)
				}
			}
			pos = end
		}
	})
}

func FuzzParseHello(f *testing.F) {
	addPayloadSeeds(f, frame.TypeHello)
	f.Add(append(make([]byte, wantHelloFixed-1), 3, 'a', 'b'))
	// The optional application address: valid, empty (refused), and
	// lengths one off either way.
	route := append(make([]byte, wantHelloFixed-1), 2, 'd', 'b')
	f.Add(append(append(route[:len(route):len(route)], 9), "1.2.3.4:5"...))
	f.Add(append(route[:len(route):len(route)], 0))
	f.Add(append(append(route[:len(route):len(route)], 10), "1.2.3.4:5"...))
	f.Add(append(append(route[:len(route):len(route)], 8), "1.2.3.4:5"...))
	f.Add(append(append(make([]byte, wantHelloFixed-1), 0, 21), "[2001:db8::1]:65535"...))
	f.Fuzz(func(t *testing.T, p []byte) {
		h, err := frame.ParseHello(p)
		// The spec's rule, independent of the decoder: route, then
		// nothing or exactly appLen (>= 1) bytes.
		ok, appAt := false, 0
		if len(p) >= wantHelloFixed {
			rest := len(p) - wantHelloFixed - int(p[wantHelloFixed-1])
			appAt = len(p) - rest
			ok = rest == 0 || rest > 1 && int(p[appAt]) == rest-1
		}
		if !ok {
			if err == nil || h != nil || !errors.Is(err, frame.ErrLength) {
				t.Fatalf("ParseHello(%x) = %+v, %v; want ErrLength", p, h, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("ParseHello(%x): %v", p, err)
		}
		if len(h.Route) > wantMaxRoute || len(h.App) > wantMaxApp {
			t.Fatalf("route of %d bytes, app of %d from a %d-byte payload", len(h.Route), len(h.App), len(p))
		}
		if !bytes.Equal(h.Key[:], p[:32]) || h.Route != string(p[wantHelloFixed:appAt]) {
			t.Fatalf("fields at the wrong offsets: %+v", h)
		}
		if appAt < len(p) && h.App != string(p[appAt+1:]) || appAt == len(p) && h.App != "" {
			t.Fatalf("application address %q from %x", h.App, p[appAt:])
		}
		checkCanonical(t, frame.TypeHello, p)
	})
}

func FuzzParseWelcome(f *testing.F) {
	addPayloadSeeds(f, frame.TypeWelcome)
	f.Fuzz(func(t *testing.T, p []byte) {
		w, err := frame.ParseWelcome(p)
		if len(p) != wantWelcomeLen {
			if w != nil || !errors.Is(err, frame.ErrLength) {
				t.Fatalf("ParseWelcome(%d bytes) = %+v, %v; want ErrLength", len(p), w, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("ParseWelcome(%x): %v", p, err)
		}
		if !bytes.Equal(w.SessionID[:], p[:16]) || !bytes.Equal(w.Key[:], p[16:48]) {
			t.Fatalf("fields at the wrong offsets: %+v", w)
		}
		checkCanonical(t, frame.TypeWelcome, p)
	})
}

func FuzzParseResume(f *testing.F) {
	addPayloadSeeds(f, frame.TypeResume)
	addFlagSeeds(f, frame.TypeResume, 72)
	f.Fuzz(func(t *testing.T, p []byte) {
		r, err := frame.ParseResume(p)
		if len(p) != wantResumeLen {
			if r != nil || !errors.Is(err, frame.ErrLength) {
				t.Fatalf("ParseResume(%d bytes) = %+v, %v; want ErrLength", len(p), r, err)
			}
			return
		}
		if p[72]&^frame.AckFin != 0 {
			if r != nil || err == nil || !errors.Is(err, frame.ErrMalformed) {
				t.Fatalf("RESUME flags 0x%02x: %+v, %v; want ErrMalformed", p[72], r, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("ParseResume(%x): %v", p, err)
		}
		if !bytes.Equal(r.Signed(), p[:73]) || !bytes.Equal(r.Proof[:], p[73:]) {
			t.Fatalf("Signed/Proof do not split the payload: %+v", r)
		}
		checkCanonical(t, frame.TypeResume, p)
	})
}

func FuzzParseResumed(f *testing.F) {
	addPayloadSeeds(f, frame.TypeResumed)
	addFlagSeeds(f, frame.TypeResumed, 48)
	f.Fuzz(func(t *testing.T, p []byte) {
		r, err := frame.ParseResumed(p)
		if len(p) != wantResumedLen {
			if r != nil || !errors.Is(err, frame.ErrLength) {
				t.Fatalf("ParseResumed(%d bytes) = %+v, %v; want ErrLength", len(p), r, err)
			}
			return
		}
		if p[48]&^frame.AckFin != 0 {
			if r != nil || err == nil || !errors.Is(err, frame.ErrMalformed) {
				t.Fatalf("RESUMED flags 0x%02x: %+v, %v; want ErrMalformed", p[48], r, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("ParseResumed(%x): %v", p, err)
		}
		if !bytes.Equal(r.Signed(), p[:57]) || !bytes.Equal(r.Proof[:], p[57:]) {
			t.Fatalf("Signed/Proof do not split the payload: %+v", r)
		}
		checkCanonical(t, frame.TypeResumed, p)
	})
}

func FuzzParseAck(f *testing.F) {
	addPayloadSeeds(f, frame.TypeAck)
	addFlagSeeds(f, frame.TypeAck, 16)
	f.Fuzz(func(t *testing.T, p []byte) {
		a, err := frame.ParseAck(p)
		if len(p) != wantAckLen {
			if !errors.Is(err, frame.ErrLength) {
				t.Fatalf("ParseAck(%d bytes) = %+v, %v; want ErrLength", len(p), a, err)
			}
			return
		}
		if p[16]&^frame.AckFin != 0 {
			if err == nil || !errors.Is(err, frame.ErrMalformed) {
				t.Fatalf("ACK flags 0x%02x: %+v, %v; want ErrMalformed", p[16], a, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("ParseAck(%x): %v", p, err)
		}
		checkCanonical(t, frame.TypeAck, p)
	})
}

func FuzzParseCodeReason(f *testing.F) {
	addPayloadSeeds(f, frame.TypeReset)
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, p []byte) {
		cr, err := frame.ParseCodeReason(p)
		if len(p) < 2 || len(p) > 2+wantMaxReason {
			if !errors.Is(err, frame.ErrLength) {
				t.Fatalf("ParseCodeReason(%d bytes) = %+v, %v; want ErrLength", len(p), cr, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("ParseCodeReason(%x): %v", p, err)
		}
		if uint16(cr.Code) != uint16(p[0])<<8|uint16(p[1]) || cr.Reason != string(p[2:]) {
			t.Fatalf("ParseCodeReason(%x) = %+v", p, cr)
		}
		checkCanonical(t, frame.TypeReset, p)
		// Encoding a longer reason truncates it to a valid frame.
		long := cr.Reason + strings.Repeat("+", 300)
		enc := frame.AppendCodeReason(nil, frame.TypeReset, cr.Code, long)
		h, err := frame.ParseHeader(enc)
		if err != nil || h.Len != 2+wantMaxReason || len(enc) != frame.HeaderLen+h.Len {
			t.Fatalf("long reason: header %+v, %v, %d bytes", h, err, len(enc))
		}
		if got, err := frame.ParseCodeReason(enc[frame.HeaderLen:]); err != nil || got.Reason != long[:wantMaxReason] {
			t.Fatalf("long reason parsed as %q, %v", got.Reason, err)
		}
	})
}

func FuzzParseGoAway(f *testing.F) {
	addPayloadSeeds(f, frame.TypeGoAway)
	f.Add([]byte{0, 0, 5, 'a'})
	f.Fuzz(func(t *testing.T, p []byte) {
		g, err := frame.ParseGoAway(p)
		if err != nil {
			if !errors.Is(err, frame.ErrLength) {
				t.Fatalf("ParseGoAway(%x): %v, want ErrLength", p, err)
			}
			return
		}
		if len(p) < 3 || len(g.Addr) != int(p[2]) || len(g.Reason) > wantMaxReason {
			t.Fatalf("ParseGoAway(%x) = %+v", p, g)
		}
		checkCanonical(t, frame.TypeGoAway, p)
	})
}

func FuzzParseReject(f *testing.F) {
	addPayloadSeeds(f, frame.TypeReject)
	f.Add([]byte{0, 4, 0})
	f.Fuzz(func(t *testing.T, p []byte) {
		r, err := frame.ParseReject(p)
		if err != nil {
			if !errors.Is(err, frame.ErrLength) {
				t.Fatalf("ParseReject(%x): %v, want ErrLength", p, err)
			}
			return
		}
		if r.Code != frame.CodeThrottled && r.RetryAfter != 0 {
			t.Fatalf("ParseReject(%x) = %+v: a retry delay on a %v", p, r, r.Code)
		}
		checkCanonical(t, frame.TypeReject, p)
	})
}
