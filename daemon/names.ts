// Volume and snapshot names become file names inside the data directory; the rule is
// cow/'s, so a name the daemon accepts is never refused by the engine.
import { isValidName } from '../cow/names.js';
import { Errors } from './errors.js';

export { isValidName };

export function checkName(name: string): string {
  if (!isValidName(name)) throw Errors.invalidName(name);
  return name;
}
