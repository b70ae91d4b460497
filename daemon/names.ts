// Volume and snapshot names become file names inside the data directory, so
// they are checked against a strict pattern: no separators, no dot-files, no traversal.
import { Errors } from './errors.js';

const NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/;

export function isValidName(name: string): boolean {
  return NAME.test(name);
}

export function checkName(name: string): string {
  if (!isValidName(name)) throw Errors.invalidName(name);
  return name;
}
