package transport

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"os"
	"strings"
	"sync/atomic"
	"time"
)

// TLS configuration, all of it: what each transport requires of a config
// it is given, the configs built from certificate files (CertStore), from
// a pin (PinnedTLS) or from a generated certificate (ServerTLS), and the
// dial errors that retrying does not heal. Errors here name files and
// settings, never a command-line flag: the command says which flag set
// them.
//
// Versions. The tls transport accepts TLS 1.2 and 1.3. On TLS 1.2 the
// session engine's link binding needs the extended master secret (EMS):
// crypto/tls negotiates it whenever the peer offers it, as every Go peer
// does, and refuses ExportKeyingMaterial on a 1.2 connection without it, so
// a peer without EMS cannot open a session (it fails closed). The quic
// transport requires TLS 1.3 (RFC 9001) and the ALPN QUICALPN; the tls
// transport gets neither forced on it.

// TLS versions the transports require at least.
const (
	minTLSVersion  = tls.VersionTLS12
	minQUICVersion = tls.VersionTLS13
)

// linkTLS clones c for a transport: at least minVersion (a MaxVersion
// below it is dropped) and, if alpn is set, that ALPN, also on the configs
// GetConfigForClient hands out per handshake (certificate reloading,
// mTLS), or they would undo it.
func linkTLS(c *tls.Config, minVersion uint16, alpn []string) *tls.Config {
	tc := c.Clone()
	if tc.MinVersion < minVersion {
		tc.MinVersion = minVersion
	}
	if tc.MaxVersion != 0 && tc.MaxVersion < minVersion {
		tc.MaxVersion = 0
	}
	if alpn != nil {
		tc.NextProtos = alpn
	}
	if get := tc.GetConfigForClient; get != nil {
		// The fixed-up clone of the config get returned last: a get
		// that returns one config for many handshakes (ServerConfig's)
		// then costs no clone per connection.
		var last atomic.Pointer[fixedConfig]
		tc.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			c, err := get(hello)
			if err != nil || c == nil {
				return c, err
			}
			if l := last.Load(); l != nil && l.from == c {
				return l.fixed, nil
			}
			fixed := linkTLS(c, minVersion, alpn)
			last.Store(&fixedConfig{from: c, fixed: fixed})
			return fixed, nil
		}
	}
	return tc
}

// fixedConfig is a config that a GetConfigForClient returned and linkTLS's
// fix-up of it.
type fixedConfig struct{ from, fixed *tls.Config }

// transportTLS is what transport name requires of a TLS config.
func transportTLS(name string, c *tls.Config) *tls.Config {
	if name == "quic" {
		return linkTLS(c, minQUICVersion, []string{QUICALPN})
	}
	return linkTLS(c, minTLSVersion, nil)
}

// gatewayTLS checks and clones a gateway's TLS config for transport name.
func gatewayTLS(name string, c *tls.Config) (*tls.Config, error) {
	if c == nil {
		return nil, fmt.Errorf("transport %s: the gateway needs a tls.Config with a certificate (see CertStore, ServerTLS)", name)
	}
	if len(c.Certificates) == 0 && c.GetCertificate == nil && c.GetConfigForClient == nil {
		return nil, fmt.Errorf("transport %s: the gateway's tls.Config has no certificate", name)
	}
	return transportTLS(name, c), nil
}

// clientTLS checks and clones a client's TLS config for transport name
// and the gateway host (the server name unless c sets one). nil verifies
// the gateway against the system roots. InsecureSkipVerify without a
// check of its own (a pin: VerifyPeerCertificate or VerifyConnection)
// would accept any gateway and is refused.
func clientTLS(name string, c *tls.Config, host string) (*tls.Config, error) {
	if c == nil {
		c = &tls.Config{}
	}
	if c.InsecureSkipVerify && c.VerifyPeerCertificate == nil && c.VerifyConnection == nil {
		return nil, fmt.Errorf("transport %s: InsecureSkipVerify without a certificate pin would accept any gateway; use PinnedTLS", name)
	}
	tc := transportTLS(name, c)
	if tc.ServerName == "" {
		tc.ServerName = host
	}
	return tc, nil
}

// ---- certificate files ----

// TLSFiles names the PEM files of one TLS endpoint.
type TLSFiles struct {
	Cert       string `yaml:"cert"`
	Key        string `yaml:"key"`
	CA         string `yaml:"ca"`
	ServerName string `yaml:"server_name"`
	// Pin (client only) is the SHA-256 of the gateway's certificate, for
	// a gateway with a self-signed one; checked instead of a CA chain.
	Pin string `yaml:"pin"`
}

// Empty reports whether no TLS setting is given.
func (f TLSFiles) Empty() bool { return f == TLSFiles{} }

// CertStore holds a certificate and CA pool loaded from files, swapped
// atomically by Reload so that new handshakes use the new files while
// established links and sessions carry on.
type CertStore struct {
	files TLSFiles
	cert  atomic.Pointer[tls.Certificate]
	pool  atomic.Pointer[x509.CertPool]
}

// NewCertStore loads the files; a missing or bad file is an error naming it.
func NewCertStore(f TLSFiles) (*CertStore, error) {
	s := &CertStore{files: f}
	if err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload reads the files again. On error the previous material stays.
func (s *CertStore) Reload() error {
	f := s.files
	if (f.Cert == "") != (f.Key == "") {
		return fmt.Errorf("tls: a certificate and its key must be given together (certificate %q, key %q)", f.Cert, f.Key)
	}
	var cert *tls.Certificate
	if f.Cert != "" {
		c, err := tls.LoadX509KeyPair(f.Cert, f.Key)
		if err != nil {
			return fmt.Errorf("tls certificate %s / key %s: %w", f.Cert, f.Key, err)
		}
		cert = &c
	}
	var pool *x509.CertPool
	if f.CA != "" {
		pem, err := os.ReadFile(f.CA)
		if err != nil {
			return fmt.Errorf("tls CA: %w", err)
		}
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("tls CA %s: no PEM certificate in file", f.CA)
		}
	}
	s.cert.Store(cert)
	s.pool.Store(pool)
	return nil
}

// ServerConfig is a gateway's TLS config: the current certificate, and
// client certificates required and verified when a CA is set (mTLS).
func (s *CertStore) ServerConfig() (*tls.Config, error) {
	if s.cert.Load() == nil {
		return nil, errors.New("tls: the gateway needs a certificate and its key")
	}
	base := &tls.Config{MinVersion: minTLSVersion}
	// One config per certificate and CA, shared by every handshake until
	// a reload: crypto/tls keeps the config a connection was made with
	// for the connection's life, and one each was half a KiB per idle
	// session.
	var last atomic.Pointer[servedConfig]
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		cert, pool := s.cert.Load(), s.pool.Load()
		if l := last.Load(); l != nil && l.cert == cert && l.pool == pool {
			return l.c, nil
		}
		c := &tls.Config{MinVersion: minTLSVersion}
		c.Certificates = []tls.Certificate{*cert}
		if pool != nil {
			c.ClientCAs = pool
			c.ClientAuth = tls.RequireAndVerifyClientCert
		}
		last.Store(&servedConfig{cert: cert, pool: pool, c: c})
		return c, nil
	}
	// For transports that ignore GetConfigForClient.
	base.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.cert.Load(), nil }
	return base, nil
}

// servedConfig is the config a gateway hands out for one certificate and
// CA (ServerConfig).
type servedConfig struct {
	cert *tls.Certificate
	pool *x509.CertPool
	c    *tls.Config
}

// ClientConfig is a client sidecar's TLS config: the gateway's certificate
// must match the pin, if one is set, or else chain to the CA (the system
// roots if none is set), and the client certificate, if any, is presented
// for mTLS. Verification is never skipped. A failure is a
// *tls.CertificateVerificationError (see CertVerifyFailure).
func (s *CertStore) ClientConfig() *tls.Config {
	c := &tls.Config{MinVersion: minTLSVersion, ServerName: s.files.ServerName}
	if s.files.Pin != "" {
		c = PinnedTLS(s.files.Pin, s.files.ServerName)
	} else if pool := s.pool.Load(); pool != nil {
		c.RootCAs = nil
		// Verify against the pool current at handshake time so a CA
		// reload applies to new links.
		c.InsecureSkipVerify = true
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("gateway sent no certificate")
			}
			opts := x509.VerifyOptions{Roots: s.pool.Load(), DNSName: cs.ServerName, Intermediates: x509.NewCertPool()}
			for _, ic := range cs.PeerCertificates[1:] {
				opts.Intermediates.AddCert(ic)
			}
			if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
				return certVerifyError(cs.PeerCertificates, err)
			}
			return nil
		}
	}
	c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		if cert := s.cert.Load(); cert != nil {
			return cert, nil
		}
		return &tls.Certificate{}, nil
	}
	return c
}

// ---- self-signed gateway certificates and pins ----

// SelfSignedCert makes a new self-signed ECDSA P-256 gateway certificate,
// valid for ten years, for clients to pin (CertFingerprint, PinnedTLS). A
// gateway that must keep its pin across restarts uses
// LoadOrCreateGatewayCert.
func SelfSignedCert() (tls.Certificate, error) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "lifeline gateway"},
		DNSNames:              []string{"lifeline-gateway"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv, Leaf: leaf}, nil
}

// ServerTLS is a gateway TLS config serving cert (typically a self-signed
// certificate that clients pin), for the tls and quic transports.
func ServerTLS(cert tls.Certificate) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: minTLSVersion}
}

// CertFingerprint is the lowercase hex SHA-256 of a DER certificate, the
// form PinnedTLS takes.
func CertFingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// ParseFingerprint accepts a SHA-256 fingerprint as 64 hex digits, upper
// or lower case, optionally separated by colons ("AB:CD:...").
func ParseFingerprint(s string) ([]byte, error) {
	h := strings.ReplaceAll(strings.TrimSpace(s), ":", "")
	b, err := hex.DecodeString(h)
	if err != nil || len(b) != sha256.Size {
		return nil, fmt.Errorf("tls pin %q: want the certificate's SHA-256 as 64 hex digits", s)
	}
	return b, nil
}

// PinnedTLS returns a client TLS config that accepts exactly the gateway
// certificate whose SHA-256 is fingerprintHex (see ParseFingerprint for the
// accepted forms). The usual chain and name checks are replaced by the pin
// check, which runs on every handshake, resumed ones included: the
// connection fails unless the gateway's leaf certificate matches. A
// malformed fingerprint makes every handshake fail. serverName is sent as
// SNI (may be empty).
func PinnedTLS(fingerprintHex, serverName string) *tls.Config {
	want, perr := ParseFingerprint(fingerprintHex)
	check := func(certs []*x509.Certificate) error {
		if perr != nil {
			return perr
		}
		sum := sha256.Sum256(certs[0].Raw)
		if subtle.ConstantTimeCompare(sum[:], want) != 1 {
			return certVerifyError(certs, fmt.Errorf("gateway certificate sha256 %x does not match the pin %x", sum, want))
		}
		return nil
	}
	return &tls.Config{
		ServerName: serverName,
		MinVersion: minTLSVersion,
		// Chain verification is off only because the pin check below
		// replaces it; it is never off without it.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("tls: gateway sent no certificate")
			}
			leaf, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return fmt.Errorf("tls: gateway certificate: %w", err)
			}
			return check([]*x509.Certificate{leaf})
		},
		// VerifyPeerCertificate is skipped on resumed sessions;
		// VerifyConnection is not.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("tls: gateway sent no certificate")
			}
			return check(cs.PeerCertificates)
		},
	}
}

// ---- dial errors that retrying does not heal ----

// CertVerifyFailure reports whether err (from a Dialer's Dial, or anything
// wrapping it) is the gateway's certificate failing this client's
// verification: not chaining to the system roots or the configured CA, a
// name mismatch, or a pin mismatch. It returns the certificate the gateway
// presented. Such a failure does not heal by retrying: the client is
// configured for another gateway, or the gateway for another certificate.
func CertVerifyFailure(err error) (*x509.Certificate, bool) {
	var cve *tls.CertificateVerificationError
	if !errors.As(err, &cve) {
		return nil, false
	}
	if len(cve.UnverifiedCertificates) == 0 {
		return nil, true
	}
	return cve.UnverifiedCertificates[0], true
}

// certVerifyError is what our own verification callbacks (pin, CA pool)
// return: the same type crypto/tls returns when the system roots or
// RootCAs reject a chain, so that CertVerifyFailure finds every case.
func certVerifyError(certs []*x509.Certificate, err error) error {
	return &tls.CertificateVerificationError{UnverifiedCertificates: certs, Err: err}
}

// NotTLS reports whether err is a TLS client's handshake meeting a peer
// that does not speak TLS: typically a gateway on the tcp transport dialed
// by a client on tls. Retrying does not heal it.
func NotTLS(err error) bool {
	var rhe tls.RecordHeaderError
	var rhep *tls.RecordHeaderError
	return errors.As(err, &rhe) || errors.As(err, &rhep)
}
