//go:build race

package e2e

// raceEnabled: the keyd under test is built with -race too, which reuses
// the packages this test run already compiled and checks keyd for races.
const raceEnabled = true
