package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
)

// report is the JSON object the bench prints as its last line.
type report struct {
	Machine machine                        `json:"machine"`
	Runs    int                            `json:"runs"`
	Config  reportConfig                   `json:"config"`
	Results map[string]map[string]*summary `json:"results"` // phase → system
	Ratios  map[string]map[string]ratio    `json:"ratios"`  // phase → "batchq/asynq-plain" and the like
}

// machine describes where the bench ran.
type machine struct {
	CPUs       int    `json:"cpus"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	CPUModel   string `json:"cpu_model,omitempty"`
	OS         string `json:"os"`
	Arch       string `json:"arch"`
	Go         string `json:"go"`
	Redis      string `json:"redis"`
}

// reportConfig is the workload, so that a report says what it measured.
type reportConfig struct {
	Items         int     `json:"items"`
	Keys          int     `json:"keys"`
	Producers     int     `json:"producers"`
	Concurrency   int     `json:"concurrency"`
	Shards        int     `json:"shards"`
	Rate          int     `json:"rate"`
	RateItems     int     `json:"rate_items"`
	HotItems      int     `json:"hot_items"`
	BusyItems     int     `json:"busy_items"`
	HotColdItems  int     `json:"hot_cold_items"`
	BusyWorkMs    float64 `json:"busy_work_ms"` // busy-key: what the handler takes per item
	PhaseTimeoutS float64 `json:"phase_timeout_s"`
	Replica       bool    `json:"replica"` // the server had a replica (-replica)
	Acks          string  `json:"batchq_acks"`
	Linger        string  `json:"batchq_linger"`
	AsynqGroup    struct {
		MaxSize      int     `json:"group_max_size"`
		GracePeriodS float64 `json:"group_grace_period_s"`
		MaxDelayS    float64 `json:"group_max_delay_s"`
		HotItems     int     `json:"hot_items"`
	} `json:"asynq_group"`
	AsynqPlainItems int `json:"asynq_plain_items"` // cap on asynq-plain's items, fixed-rate aside
}

// summary is one phase on one system: the median of each figure over the
// runs, and the sums of the counts that should be zero.
type summary struct {
	ItemsPerS          float64   `json:"items_per_s"`
	CmdsPerItem        float64   `json:"cmds_per_item"`
	TripsPerItem       float64   `json:"round_trips_per_item"`
	CPUUsPerItem       float64   `json:"cpu_us_per_item"`
	SysCPUUsPerItem    float64   `json:"cpu_sys_us_per_item"` // of cpu_us_per_item, Redis' time in the kernel
	ClientCPUUsPerItem float64   `json:"client_cpu_us_per_item"`
	MemBytesPerItem    *float64  `json:"memory_bytes_per_item,omitempty"` // append: Redis memory per stored item
	P50ms              *float64  `json:"p50_ms,omitempty"`
	P99ms              *float64  `json:"p99_ms,omitempty"`
	MaxMs              *float64  `json:"max_ms,omitempty"`
	HandlingS          *float64  `json:"handling_s,omitempty"` // busy-key: first handler call to last, what items_per_s is over
	TotalS             *float64  `json:"total_s,omitempty"`    // busy-key: workers' start to the last item handled
	Items              int       `json:"items"`                // items of one run
	Lost               int64     `json:"lost"`                 // over all runs
	Duplicates         int64     `json:"duplicates"`           // over all runs
	AppendErrors       int64     `json:"append_errors"`        // over all runs
	Timeout            bool      `json:"timeout"`              // in any run
	RunsPerS           []float64 `json:"items_per_s_runs"`
}

// ratio compares batchq with asynq on one phase; above 1 means batchq is
// better.
type ratio struct {
	ThroughputX float64  `json:"throughput_x"`       // batchq items/s ÷ asynq items/s
	CPUX        float64  `json:"cpu_x"`              // asynq Redis CPU per item ÷ batchq's
	CmdsX       float64  `json:"cmds_x"`             // asynq Redis commands per item ÷ batchq's
	TripsX      float64  `json:"round_trips_x"`      // asynq client round trips per item ÷ batchq's
	ClientCPUX  float64  `json:"client_cpu_x"`       // asynq's process CPU per item ÷ batchq's
	MemX        *float64 `json:"memory_x,omitempty"` // append: asynq Redis memory per stored item ÷ batchq's
}

// newReport summarises results (phase → system → one result per run).
func newReport(cfg *config, redisVersion string, results map[string]map[string][]result) *report {
	rep := &report{
		Machine: machine{CPUs: runtime.NumCPU(), GOMAXPROCS: runtime.GOMAXPROCS(0), CPUModel: cpuModel(),
			OS: runtime.GOOS, Arch: runtime.GOARCH, Go: runtime.Version(), Redis: redisVersion},
		Runs:    cfg.runs,
		Results: make(map[string]map[string]*summary),
		Ratios:  make(map[string]map[string]ratio),
	}
	rc := &rep.Config
	rc.Items, rc.Keys, rc.Producers, rc.Concurrency, rc.Shards = cfg.n, cfg.keys, cfg.producers, cfg.concurrency, cfg.shards
	rc.Rate, rc.RateItems, rc.HotItems, rc.PhaseTimeoutS = cfg.rate, cfg.rateItems, cfg.hotItems, cfg.phaseTimeout.Seconds()
	rc.BusyItems, rc.BusyWorkMs, rc.HotColdItems = cfg.busyItems, float64(busyWork)/1e6, cfg.hotColdItems
	rc.Replica, rc.Acks = cfg.replica, fmt.Sprintf("WithReplicaAcks(%d, %v)", ackReplicas, ackTimeout)
	rc.Linger = fmt.Sprintf("WithLinger(%v, %d)", lingerWait, lingerItems)
	rc.AsynqGroup.MaxSize, rc.AsynqGroup.GracePeriodS = cfg.groupMaxSize, cfg.groupGrace.Seconds()
	rc.AsynqGroup.MaxDelayS, rc.AsynqGroup.HotItems = cfg.groupMaxDelay.Seconds(), cfg.items(phaseHotKey, sysAsynqGroup)
	rc.AsynqPlainItems = cfg.asynqPlainItems

	for phase, bySystem := range results {
		rep.Results[phase] = make(map[string]*summary)
		for system, runs := range bySystem {
			rep.Results[phase][system] = summarise(phase, runs)
		}
		ratios := make(map[string]ratio)
		for bq, aq := range pairs {
			b, a := rep.Results[phase][bq], rep.Results[phase][aq]
			if b != nil && a != nil {
				r := ratio{
					ThroughputX: round(div(b.ItemsPerS, a.ItemsPerS), 3),
					CPUX:        round(div(a.CPUUsPerItem, b.CPUUsPerItem), 3),
					CmdsX:       round(div(a.CmdsPerItem, b.CmdsPerItem), 3),
					TripsX:      round(div(a.TripsPerItem, b.TripsPerItem), 3),
					ClientCPUX:  round(div(a.ClientCPUUsPerItem, b.ClientCPUUsPerItem), 3),
				}
				if b.MemBytesPerItem != nil && a.MemBytesPerItem != nil {
					r.MemX = ptr(round(div(*a.MemBytesPerItem, *b.MemBytesPerItem), 3))
				}
				ratios[bq+"/"+aq] = r
			}
		}
		if len(ratios) > 0 {
			rep.Ratios[phase] = ratios
		}
	}
	return rep
}

// rows yields the phase and system of each row of the table, in order.
func (rep *report) rows(yield func(phase, system string) bool) {
	for _, p := range allPhases {
		for _, s := range allSystems {
			if rep.Results[p][s] != nil && !yield(p, s) {
				return
			}
		}
	}
}

// pairs yields the (batchq system, asynq system) pairs the ratios compare.
func pairs(yield func(bq, aq string) bool) {
	for _, bq := range []string{sysBatchq, sysBatchqLinger, sysBatchqOrder} {
		for _, aq := range []string{sysAsynqPlain, sysAsynqGroup} {
			if !yield(bq, aq) {
				return
			}
		}
	}
}

// summarise takes the median of each figure over runs.
func summarise(phase string, runs []result) *summary {
	s := &summary{Items: runs[0].items}
	var ips, cmds, trips, cpu, sys, ccpu, mem, p50, p99, pmax, handling, total []float64
	for _, r := range runs {
		c := float64(r.count(phase))
		ips = append(ips, div(c, r.span(phase).Seconds()))
		handling = append(handling, r.handling.Seconds())
		total = append(total, r.elapsed.Seconds())
		cmds = append(cmds, div(float64(r.commands), c))
		trips = append(trips, div(float64(r.trips), c))
		cpu = append(cpu, div(r.cpu*1e6, c))
		sys = append(sys, div(r.cpuSys*1e6, c))
		ccpu = append(ccpu, div(r.clientCPU*1e6, c))
		mem = append(mem, div(float64(r.memory), c))
		if len(r.latencies) > 0 {
			p50 = append(p50, float64(percentile(r.latencies, 0.50))/1e6)
			p99 = append(p99, float64(percentile(r.latencies, 0.99))/1e6)
			pmax = append(pmax, float64(r.latencies[len(r.latencies)-1])/1e6)
		}
		s.Lost += r.lost
		s.Duplicates += r.duplicates
		s.AppendErrors += r.appendErrs
		s.Timeout = s.Timeout || r.timeout
		s.RunsPerS = append(s.RunsPerS, round(ips[len(ips)-1], 1))
	}
	s.ItemsPerS = round(median(ips), 1)
	s.CmdsPerItem = round(median(cmds), 3)
	s.TripsPerItem = round(median(trips), 3)
	s.CPUUsPerItem = round(median(cpu), 3)
	s.SysCPUUsPerItem = round(median(sys), 3)
	s.ClientCPUUsPerItem = round(median(ccpu), 3)
	if phase == phaseAppend {
		s.MemBytesPerItem = ptr(round(median(mem), 1))
	}
	if phase == phaseBusyKey {
		s.HandlingS, s.TotalS = ptr(round(median(handling), 3)), ptr(round(median(total), 3))
	}
	if len(p50) > 0 {
		s.P50ms, s.P99ms, s.MaxMs = ptr(round(median(p50), 3)), ptr(round(median(p99), 3)), ptr(round(median(pmax), 3))
	}
	return s
}

// write prints the table, then the JSON object as the last line.
func (rep *report) write(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "phase\tsystem\titems/s\tcmds/item\ttrips/item\tredis-cpu µs/item\tclient-cpu µs/item\tp50\tp99\tnotes\t")
	for phase, system := range rep.rows {
		s := rep.Results[phase][system]
		fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.2f\t%.2f\t%.1f\t%.1f\t%s\t%s\t%s\t\n", phase, system, s.ItemsPerS, s.CmdsPerItem,
			s.TripsPerItem, s.CPUUsPerItem, s.ClientCPUUsPerItem, msCell(s.P50ms), msCell(s.P99ms), s.notes(rep.phaseItems(phase)))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(rep.Ratios) > 0 {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "batchq vs asynq (throughput_x: items/s ratio; the others: asynq per item ÷ batchq per item; >1 favours batchq)")
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "phase\tpair\tthroughput_x\tcpu_x\tcmds_x\ttrips_x\tclient_cpu_x\tmemory_x\t")
		for _, phase := range allPhases {
			for bq, aq := range pairs {
				if r, ok := rep.Ratios[phase][bq+"/"+aq]; ok {
					mem := "-"
					if r.MemX != nil {
						mem = strconv.FormatFloat(*r.MemX, 'f', 2, 64)
					}
					fmt.Fprintf(tw, "%s\t%s\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t\n", phase, bq+"/"+aq, r.ThroughputX, r.CPUX, r.CmdsX,
						r.TripsX, r.ClientCPUX, mem)
				}
			}
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	line, err := json.Marshal(rep)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", line)
	return err
}

// phaseItems returns the items a phase offers the systems it does not cap
// (see config.items).
func (rep *report) phaseItems(phase string) int {
	switch phase {
	case phaseRate:
		return rep.Config.RateItems
	case phaseHotKey:
		return rep.Config.HotItems
	case phaseBusyKey:
		return rep.Config.BusyItems
	case phaseHotCold:
		return rep.Config.HotColdItems
	}
	return rep.Config.Items
}

// notes flags what a reader must not miss in a row: failures, and items
// other than the phase's.
func (s *summary) notes(phaseItems int) string {
	var n []string
	if s.Timeout {
		n = append(n, "TIMEOUT")
	}
	if s.Lost > 0 {
		n = append(n, fmt.Sprintf("lost=%d", s.Lost))
	}
	if s.Duplicates > 0 {
		n = append(n, fmt.Sprintf("dup=%d", s.Duplicates))
	}
	if s.AppendErrors > 0 {
		n = append(n, fmt.Sprintf("append-errors=%d", s.AppendErrors))
	}
	if s.Items != phaseItems {
		n = append(n, fmt.Sprintf("items=%d", s.Items))
	}
	if s.TotalS != nil {
		n = append(n, fmt.Sprintf("total=%.2fs", *s.TotalS))
	}
	return strings.Join(n, " ")
}

// failure returns an error when any phase lost or duplicated items or timed
// out.
func (rep *report) failure() error {
	var bad []string
	for phase, system := range rep.rows {
		if s := rep.Results[phase][system]; s.Lost > 0 || s.Duplicates > 0 || s.Timeout {
			bad = append(bad, phase+"/"+system)
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("lost or duplicated items, or timed out: %s", strings.Join(bad, ", "))
	}
	return nil
}

// cpuModel returns the CPU's model name on Linux, or "".
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// median returns the median of xs (0 for none).
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(xs))
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// div returns a/b, or 0 when b is 0 (JSON has no infinity).
func div(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// round rounds x to the given decimals.
func round(x float64, decimals int) float64 {
	p := math.Pow(10, float64(decimals))
	return math.Round(x*p) / p
}

func ptr(x float64) *float64 { return &x }

// msCell formats a latency cell of the table.
func msCell(v *float64) string {
	if v == nil {
		return "-"
	}
	return strconv.FormatFloat(*v, 'f', 1, 64) + "ms"
}
