// Package frame is lifeline's wire format: the link preamble, the frame
// header, the data-phase frames (DATA, ACK, PING, PONG, CLOSE_WRITE, RESET,
// GOAWAY), the handshake messages (HELLO, WELCOME, RESUME, RESUMED,
// REJECT) and the error codes they carry. docs/protocol.md is the
// specification; this package is its reference encoder and decoder.
//
// Every frame is a 4-byte header (type u8, payload length u24 big-endian)
// followed by the payload. Integers are big-endian. A decoder checks the
// length against the type's bounds before it reads or allocates anything,
// so a hostile peer cannot make it buffer more than MaxPayload bytes.
//
// Encoding appends to a caller's slice, so a sender reuses one buffer:
//
//	buf = frame.AppendAck(buf[:0], frame.Ack{Received: n, Window: n + 2<<20})
//	buf = frame.AppendDataHeader(buf, len(chunk)) // then write chunk itself
//
// Decoding goes through a Reader, which never allocates per frame. Control
// payloads are returned in an internal buffer valid until the next call;
// DATA payloads are copied by ReadData straight into the caller's buffer,
// in as many calls as it likes:
//
//	r := frame.NewReader(conn, 64<<10)
//	for {
//		h, err := r.Next() // io.EOF only at a frame boundary
//		if err != nil {
//			return err
//		}
//		if h.Type == frame.TypeData {
//			for r.DataRemaining() > 0 {
//				n, err := r.ReadData(buf)
//				// deliver buf[:n]
//			}
//			continue
//		}
//		p, err := r.Payload(h)
//		// frame.ParseAck(p), frame.ParseU64(p), ...
//	}
//
// Decoding errors wrap ErrMalformed; a peer that sends one is answered with
// RESET (or REJECT during the handshake) carrying CodeValidation.
package frame
