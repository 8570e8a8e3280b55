package proxy

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/lifeline-proxy/lifeline/proxy/transport"
)

// ProxyProtocolRefusals returns the counter of link connections a gateway
// refused for their PROXY protocol header (transport.ProxyIn.Refused),
// lifeline_proxy_protocol_refusals_total{reason}, registered on m's
// registry the first time (every reason exported from 0, so that a rate
// over it works before the first refusal).
func (m *PromMetrics) ProxyProtocolRefusals() func(reason string) {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "lifeline_proxy_protocol_refusals_total",
		Help: "Gateway only: link connections closed for their PROXY protocol header, by reason (untrusted_header: from a source not in --proxy-protocol-from; missing_header, header_timeout, bad_header: from a trusted source).",
	}, []string{"reason"})
	if err := m.reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if !errors.As(err, &are) {
			panic(err)
		}
		c = are.ExistingCollector.(*prometheus.CounterVec)
	}
	for _, r := range transport.ProxyRefusalReasons {
		c.WithLabelValues(r)
	}
	return func(reason string) { c.WithLabelValues(reason).Inc() }
}
