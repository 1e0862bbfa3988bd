package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/batchq/batchq/producer"
)

// TestQuick runs the whole program in -quick mode, with tiny sizes, on a
// private redis-server, and checks that the JSON line reports every phase
// of every system (busy-key aside where skipped) with items handled and none
// lost, and busy-key with all its items handled exactly once.
func TestQuick(t *testing.T) {
	addr := startRedis(t)
	args := []string{"-redis", addr, "-quick",
		"-n", "1000", "-keys", "50", "-producers", "8", "-concurrency", "8",
		"-rate", "2000", "-rate-items", "400", "-hot-items", "500", "-group-hot-items", "200", "-busy-items", "300", "-hot-cold-items", "400",
		"-phase-timeout", "60s"}
	report := runReport(t, args)
	var rep struct {
		Runs    int `json:"runs"`
		Results map[string]map[string]struct {
			ItemsPerS float64  `json:"items_per_s"`
			Trips     float64  `json:"round_trips_per_item"`
			ClientCPU float64  `json:"client_cpu_us_per_item"`
			CPU       float64  `json:"cpu_us_per_item"`
			SysCPU    *float64 `json:"cpu_sys_us_per_item"`
			Memory    *float64 `json:"memory_bytes_per_item"`
			Lost      *int64   `json:"lost"`
			Items     int      `json:"items"`
			Dups      *int64   `json:"duplicates"`
			AppendErr *int64   `json:"append_errors"`
			HandlingS *float64 `json:"handling_s"`
			P99ms     *float64 `json:"p99_ms"`
		} `json:"results"`
		Ratios map[string]map[string]struct {
			ThroughputX float64 `json:"throughput_x"`
		} `json:"ratios"`
	}
	if err := json.Unmarshal(report, &rep); err != nil {
		t.Fatalf("the last line is not the JSON report: %v", err)
	}
	if rep.Runs != 1 {
		t.Errorf("runs = %d, want 1 (-quick)", rep.Runs)
	}
	for _, phase := range allPhases {
		for _, system := range defaultSystems {
			r, ok := rep.Results[phase][system]
			if skipped(phase, system) != "" {
				if ok {
					t.Errorf("%s/%s: reported, want it skipped", phase, system)
				}
				continue
			}
			switch {
			case !ok:
				t.Errorf("%s/%s: missing", phase, system)
			case r.ItemsPerS <= 0:
				t.Errorf("%s/%s: items_per_s = %v, want > 0", phase, system, r.ItemsPerS)
			case r.Lost == nil || *r.Lost != 0:
				t.Errorf("%s/%s: lost = %v, want 0", phase, system, r.Lost)
			case r.Trips <= 0 || r.ClientCPU <= 0:
				t.Errorf("%s/%s: round trips %v, client CPU %v µs per item, want both > 0", phase, system, r.Trips, r.ClientCPU)
			case r.SysCPU == nil || *r.SysCPU < 0 || *r.SysCPU > r.CPU:
				// Not > 0: a short phase may pass between the kernel's
				// CPU-time samples.
				t.Errorf("%s/%s: Redis CPU %v µs per item, %v of it sys; want 0 <= sys <= all", phase, system, r.CPU, r.SysCPU)
			case phase == phaseAppend && (r.Memory == nil || *r.Memory <= 0):
				t.Errorf("%s/%s: memory per item %v, want > 0", phase, system, r.Memory)
			case phase == phaseAppend && system != sysBatchqLinger && (r.Trips < 1 || r.Trips > 1.05):
				// One call per item, plus a few at start (registry, clock).
				t.Errorf("%s/%s: %v round trips per item, want 1", phase, system, r.Trips)
			case phase == phaseBusyKey && (r.Items != 300 || r.Dups == nil || *r.Dups != 0 || r.AppendErr == nil || *r.AppendErr != 0):
				// 300 appended without error, none lost: each handled once.
				t.Errorf("%s/%s: items %d, duplicates %v, append errors %v; want 300, 0, 0", phase, system, r.Items, r.Dups, r.AppendErr)
			case phase == phaseBusyKey && r.HandlingS == nil:
				t.Errorf("%s/%s: no handling_s", phase, system)
			case phase == phaseHotCold && (r.P99ms == nil || *r.P99ms <= 0):
				// The cold items' latency.
				t.Errorf("%s/%s: p99 %v, want the cold keys' latency", phase, system, r.P99ms)
			}
		}
		if _, ok := rep.Ratios[phase]["batchq/asynq-plain"]; !ok {
			t.Errorf("%s: no batchq/asynq-plain ratio", phase)
		}
	}
}

// TestReplica runs the append phase of batchq, batchq-acks and
// batchq-linger-acks with -replica, on a master and a replica the bench
// starts itself, and checks that every append was stored (and, with acks,
// acknowledged by the replica), each in one round trip or, lingering, less:
// the WAIT goes in the same round trip as its merge call.
func TestReplica(t *testing.T) {
	needRedis(t)
	args := []string{"-replica", "-systems", "batchq,batchq-acks,batchq-linger-acks", "-phases", "append", "-runs", "1",
		"-n", "500", "-keys", "50", "-producers", "8", "-phase-timeout", "30s"}
	report := runReport(t, args)
	var rep struct {
		Config struct {
			Replica bool `json:"replica"`
		} `json:"config"`
		Results map[string]map[string]struct {
			ItemsPerS float64 `json:"items_per_s"`
			Trips     float64 `json:"round_trips_per_item"`
			Lost      *int64  `json:"lost"`
			AppendErr *int64  `json:"append_errors"`
		} `json:"results"`
	}
	if err := json.Unmarshal(report, &rep); err != nil {
		t.Fatalf("the last line is not the JSON report: %v", err)
	}
	if !rep.Config.Replica {
		t.Error("config.replica = false, want true")
	}
	for _, system := range []string{sysBatchq, sysBatchqAcks, sysLingerAcks} {
		r, ok := rep.Results[phaseAppend][system]
		switch {
		case !ok:
			t.Errorf("append/%s: missing", system)
		case r.ItemsPerS <= 0:
			t.Errorf("append/%s: items_per_s = %v, want > 0", system, r.ItemsPerS)
		case r.Lost == nil || *r.Lost != 0 || r.AppendErr == nil || *r.AppendErr != 0:
			t.Errorf("append/%s: lost %v, append errors %v; want 0, 0", system, r.Lost, r.AppendErr)
		case system != sysLingerAcks && (r.Trips < 1 || r.Trips > 1.05):
			t.Errorf("append/%s: %v round trips per item, want 1", system, r.Trips)
		case system == sysLingerAcks && (r.Trips <= 0 || r.Trips > 1.05):
			t.Errorf("append/%s: %v round trips per item, want at most 1 (a gathering and its WAIT are one)", system, r.Trips)
		}
	}
}

// TestReplicaAckErrors checks that appends that no replica acknowledges
// (a server without one, and a 10 ms ack timeout instead of batchq-acks'
// second) fail the append phase as other append errors do: counted as
// append errors and as lost, so that the bench exits with an error.
func TestReplicaAckErrors(t *testing.T) {
	addr := startRedis(t)
	cfg, err := parseFlags([]string{"-redis", addr, "-n", "8", "-producers", "8"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	st, err := dialStats(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	b := &bench{ctx: context.Background(), cfg: cfg, stats: st}
	sys := batchqSystem{cfg: cfg, trips: &b.trips, ackTimeout: 10 * time.Millisecond}
	r, err := b.appendOnly(sys, cfg.n)
	if err != nil {
		t.Fatal(err)
	}
	if r.produced != 0 || r.appendErrs != 8 || r.lost != 8 || !errors.Is(r.firstErr, producer.ErrReplicaAcks) {
		t.Fatalf("appended %d, append errors %d, lost %d, first error %v; want 0, 8, 8 and ErrReplicaAcks",
			r.produced, r.appendErrs, r.lost, r.firstErr)
	}
	rep := newReport(cfg, "", map[string]map[string][]result{phaseAppend: {sysBatchqAcks: {r}}})
	if notes := rep.Results[phaseAppend][sysBatchqAcks].notes(cfg.n); !strings.Contains(notes, "append-errors=8") {
		t.Errorf("notes %q, want append-errors=8", notes)
	}
	if err := rep.failure(); err == nil {
		t.Error("failure() = nil, want the append phase failed")
	}
}

// TestFlagsRefuse checks the combinations of flags the bench refuses.
func TestFlagsRefuse(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string // in the error
	}{
		{[]string{"-systems", "batchq-acks"}, "-replica"},
		{[]string{"-systems", "batchq-linger-acks"}, "-replica"},
		{[]string{"-systems", "batchq,batchq-acks", "-redis", "127.0.0.1:1"}, "-replica"},
		{[]string{"-replica", "-redis", "127.0.0.1:1"}, "-redis"},
	} {
		_, err := parseFlags(tc.args, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("parseFlags(%q) = %v, want an error naming %s", tc.args, err, tc.want)
		}
	}
	c, err := parseFlags(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{sysBatchqAcks, sysLingerAcks} {
		if slices.Contains(c.systems, s) {
			t.Errorf("default systems %v include %s, which needs -replica", c.systems, s)
		}
	}
}

// TestRefusesNonEmptyDatabase checks that the bench leaves a database that
// holds keys alone without -force.
func TestRefusesNonEmptyDatabase(t *testing.T) {
	addr := startRedis(t)
	st, err := dialStats(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := st.do("SET", "precious", "1"); err != nil {
		t.Fatal(err)
	}
	err = run(context.Background(), []string{"-redis", addr, "-quick"}, new(bytes.Buffer), new(bytes.Buffer))
	if err == nil || !strings.Contains(err.Error(), "-force") {
		t.Fatalf("run on a non-empty database: %v, want a refusal naming -force", err)
	}
	if v, err := st.do("GET", "precious"); err != nil || v != "1" {
		t.Fatalf("GET precious = %q, %v; want it kept", v, err)
	}
}

// startRedis starts a private redis-server on a free loopback port and
// returns its address; the server is killed at cleanup. Without
// redis-server the test is skipped, or fails where CI=true.
func startRedis(t *testing.T) string {
	t.Helper()
	needRedis(t)
	s, err := startServer()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.stop)
	return s.addr
}

// needRedis skips the test when redis-server is not installed, or fails it
// where CI=true.
func needRedis(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("redis-server is not installed (required where CI=true)")
		}
		t.Skip("redis-server is not installed")
	}
}

// runReport runs the bench with args, logs its output, fails t if it
// fails, and returns its JSON report: the last line of stdout.
func runReport(t *testing.T, args []string) []byte {
	t.Helper()
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), args, &stdout, &stderr)
	t.Logf("stderr:\n%s\nstdout:\n%s", stderr.String(), stdout.String())
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	lines := strings.Split(strings.TrimRight(stdout.String(), "\n"), "\n")
	return []byte(lines[len(lines)-1])
}
