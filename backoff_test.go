package batchq_test

import (
	"testing"
	"time"

	"github.com/batchq/batchq"
)

func TestExponential(t *testing.T) {
	e := batchq.Exponential{Base: time.Second, Max: time.Minute, Factor: 2}
	for _, c := range []struct {
		failed int
		want   time.Duration
	}{
		{0, time.Second}, {1, time.Second}, {2, 2 * time.Second}, {3, 4 * time.Second},
		{6, 32 * time.Second}, {7, time.Minute}, {100, time.Minute}, {10000, time.Minute},
	} {
		if got := e.Delay(c.failed); got != c.want {
			t.Errorf("Delay(%d) = %v, want %v", c.failed, got, c.want)
		}
	}
}

func TestExponentialWithoutMaxNeverOverflows(t *testing.T) {
	e := batchq.Exponential{Base: time.Second, Factor: 10, Jitter: 0.5}
	for _, failed := range []int{1, 10, 20, 100, 1 << 20} {
		if d := e.Delay(failed); d <= 0 {
			t.Errorf("Delay(%d) = %v", failed, d)
		}
	}
}

func TestExponentialJitter(t *testing.T) {
	e := batchq.DefaultBackoff
	for failed := 1; failed <= 15; failed++ {
		mid := min(float64(e.Base)*float64(int(1)<<(failed-1)), float64(e.Max))
		lo, hi := time.Duration(mid*0.8), time.Duration(mid*1.2)
		seen := make(map[time.Duration]bool)
		for range 200 {
			d := e.Delay(failed)
			if d < lo || d > hi {
				t.Fatalf("Delay(%d) = %v outside [%v, %v]", failed, d, lo, hi)
			}
			seen[d] = true
		}
		if len(seen) < 100 {
			t.Errorf("Delay(%d): only %d distinct delays in 200: no jitter", failed, len(seen))
		}
	}
}

func TestConstantAndFunc(t *testing.T) {
	if d := batchq.Constant(3 * time.Second).Delay(7); d != 3*time.Second {
		t.Errorf("Constant: %v", d)
	}
	f := batchq.BackoffFunc(func(n int) time.Duration { return time.Duration(n) * time.Millisecond })
	if d := f.Delay(5); d != 5*time.Millisecond {
		t.Errorf("BackoffFunc: %v", d)
	}
}
